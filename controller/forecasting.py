"""One fitted `forecast.Forecaster` per policy, turned into the `decide.PeakForecast` that `decide()` reads.

`controller.pipeline` calls `PolicyForecast.peak(timestamps, values, now=..., horizon_s=...)` at every
reconcile with the policy's demand history (the Kubernetes loop, the demo and the simulator alike). The first call with enough samples fits the model; later calls
fold in only the samples newer than the last one fed (plus the last few again, since Prometheus may still
correct the tail as late scrapes arrive), and the forecaster refits its models by itself every
`refit_every_s` of new data (`refit_every_long_s` instead, when given, once the history covers
`LONG_HISTORY_S`: the simulator's week-long replays refit every 6 hours then, 30 refits instead of 168). When neither the history's tail (its last `REFEED_STEPS + 1` samples) nor the horizon changed since the last call,
the previous forecast is returned as is (restamped `computed_s=now`: it is still the forecast for the data
there is, and the history's own staleness is judged by `decide()` from `DemandHistory.fetched_s`).

A forecast that cannot be made (too few samples, a model error) gives None and the reason in `error_`, so the
plan holds capacity (`ForecastMissing`) instead of the controller failing. A policy whose forecast settings
change gets a new forecaster (`controller.pipeline.PolicyPipeline.update_policy`).

Policy model names map onto the forecast package's: `seasonalNaive` -> `snaive_day`, `seasonalProfile` ->
`profile_day` (a day's cycle fits in the default week of history; `auto` also tries the weekly ones),
`recentMax` -> `recent_max`, `gbm` and `auto` as they are.

What this module does not do: read demand (`controller.demand`) or decide anything (`controller.decide`); the
forecast reaches `decide()` as its own argument, not inside the history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

import forecast
from controller import decide, policy

FloatArray = npt.NDArray[np.float64]

MODEL_NAMES = {
    "auto": "auto",
    "seasonalNaive": "snaive_day",
    "seasonalProfile": "profile_day",
    "recentMax": "recent_max",
    "gbm": "gbm",
}
"""Policy `forecast.model` -> `forecast.Forecaster(model=...)`."""

REFEED_STEPS = 3
"""Samples before the newest fed one that are fed again: the tail of a range query can still change."""

MIN_SAMPLES = 3
"""Finite samples needed before the first fit (the forecaster's own minimum)."""

LONG_HISTORY_S = 86400.0
"""History span after which `refit_every_long_s` applies: with days of history an hour changes little."""


@dataclass(frozen=True)
class _Key:
    last_ts: float
    tail: tuple[float, ...]
    """The samples fed again each call (NaN as -1): a late correction there changes the forecast."""
    n: int
    horizon_steps: int


class PolicyForecast:
    """The forecaster of one policy: fit once, update with new samples, forecast the peak over a horizon."""

    def __init__(
        self,
        settings: policy.Forecast,
        *,
        refit_every_s: float = 3600.0,
        refit_every_long_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.refit_every_s = refit_every_s
        self.refit_every_long_s = refit_every_long_s
        self.forecaster_: forecast.Forecaster | None = None
        self.fed_until_s_: float | None = None
        """Timestamp of the newest sample given to the forecaster."""
        self.last_: decide.PeakForecast | None = None
        self.key_: _Key | None = None
        self.error_: str | None = None
        """Why the last call returned None; None after a forecast."""
        self.fits_ = 0
        """How many times a forecaster was fitted from scratch (first history, or after an error)."""

    def peak(
        self, timestamps: FloatArray, values: FloatArray, *, now: float, horizon_s: float
    ) -> decide.PeakForecast | None:
        """The `settings.quantile` quantile of the peak over `horizon_s`, or None (reason in `error_`)."""
        step_s = self.settings.step_s
        horizon_steps = max(1, math.ceil(horizon_s / step_s - 1e-9))
        n = int(timestamps.size)
        if n == 0:
            return self._fail("no demand history to forecast from")
        key = _Key(float(timestamps[-1]), _tail(values), n, horizon_steps)
        if key == self.key_ and self.last_ is not None:
            self.last_ = replace(self.last_, computed_s=now)
            return self.last_
        clean = np.where(np.isfinite(values) & (values >= 0), values, np.nan)
        try:
            if self.forecaster_ is None:
                if int(np.count_nonzero(np.isfinite(clean))) < MIN_SAMPLES:
                    return self._fail(
                        f"only {int(np.count_nonzero(np.isfinite(clean)))} demand samples so far, "
                        f"the forecast needs {MIN_SAMPLES}"
                    )
                self.forecaster_ = forecast.Forecaster(
                    model=MODEL_NAMES[self.settings.model],
                    step_s=step_s,
                    refit_every_s=self.refit_every_s,
                    history_s=self.settings.history_s,
                ).fit(timestamps, clean)
                self.fits_ += 1
            else:
                assert self.fed_until_s_ is not None
                if self.refit_every_long_s is not None and now - float(timestamps[0]) >= LONG_HISTORY_S:
                    self.forecaster_.refit_every_s = self.refit_every_long_s
                start = int(
                    np.searchsorted(timestamps, self.fed_until_s_ - REFEED_STEPS * step_s, side="left")
                )
                if start < n:
                    self.forecaster_.update(timestamps[start:], clean[start:])
            self.fed_until_s_ = float(timestamps[-1])
            q = self.settings.quantile
            result = self.forecaster_.forecast(horizon_steps, quantiles=(q,))
        except ValueError as exc:  # bad or too short a series, off-grid samples: start over next time
            self.forecaster_ = None
            return self._fail(f"forecast failed: {exc}")
        value = float(result.peak[q])
        if not math.isfinite(value):
            return self._fail(f"forecast model {result.model} gave a non-finite peak")
        self.last_ = decide.PeakForecast(
            value=max(0.0, value),
            quantile=q,
            horizon_s=horizon_steps * step_s,
            model=result.model,
            computed_s=now,
            path=tuple(float(v) for v in result.paths[q]),
        )
        self.key_ = key
        self.error_ = None
        return self.last_

    def _fail(self, message: str) -> decide.PeakForecast | None:
        self.error_ = message
        self.key_ = None
        self.last_ = None
        return None


def _tail(values: FloatArray) -> tuple[float, ...]:
    """The samples fed again each call, NaN as -1 and infinities as -2/-3 so that equal tails compare equal.

    Plain Python on four floats: this runs at every reconcile (the simulator's every 15 s tick), where
    `np.nan_to_num` cost more than the rest of a cached call.
    """
    out = []
    for v in values[-(REFEED_STEPS + 1) :].tolist():
        if v != v:
            out.append(-1.0)
        elif v in (math.inf, -math.inf):
            out.append(-2.0 if v > 0 else -3.0)
        else:
            out.append(v)
    return tuple(out)
