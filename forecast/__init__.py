"""Forestall forecast: calibrated quantile forecasts of peak stream demand. Pure numpy/scikit-learn."""
