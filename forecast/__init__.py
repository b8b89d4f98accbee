"""Forestall forecast: calibrated quantile forecasts of peak stream demand. Pure numpy/scikit-learn.

`Forecaster` is the interface (fit, update, forecast); `ForecastResult` what it returns; `forecast.series`
reads and checks series; `forecast.backtest` evaluates models by rolling origin.
"""

from forecast.errors import NotFittedError
from forecast.forecaster import Forecaster, ForecastResult

__all__ = ["ForecastResult", "Forecaster", "NotFittedError"]
