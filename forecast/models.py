"""Point-path models: seasonal naive, recent max, naive and the robust seasonal profile.

Every model here answers one question: given the history `y[:end]` on a regular grid (NaN where missing),
what is the central path of the next `horizon` steps? They answer it for many `end`s at once, which is what
makes rolling-origin backtests and conformal calibration cheap: a model is fitted once (its slow-moving
state, such as a seasonal profile) and then `predict(y, ends, horizon)` reads the recent level from each
`y[:end]` with array operations. Uncertainty is not their business: `forecast.calibration` turns a central
path into quantiles from the model's own recent errors.

Positions are absolute: sample `i` of `y` has grid index `pos0 + i`, and a seasonal phase is that index
modulo the period, so a profile keeps its alignment with the clock across refits and updates.

The seasonal profile model (`profile_day`, `profile_week`) is a multiplicative decomposition built to
survive real demand: each past day (or week) is divided by its own median before the median across days is
taken, so a launch or an outage moves one day's level but not the shape, and a spike is outvoted; the level
is the median of recent ratios `(y + c) / (S + c)`, so it follows a level shift within a few steps. The
offset `c` keeps troughs near zero from exploding the ratios.

What these models do not do: trends beyond what the recent level captures, holidays, or exogenous inputs.
The gradient-boosted model in `forecast.gbm` learns those from features when there is data to learn from.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from forecast import errors

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DAY_S = 86400.0
WEEK_S = 7 * DAY_S

PROFILE_MAX_PERIODS = 8
"""Past periods (days or weeks) in a seasonal profile: enough to outvote spikes, recent enough to adapt."""

PROFILE_SMOOTH_S = 900.0
"""The profile is smoothed over a quarter of an hour: fewer noisy samples per phase, peaks kept."""

LEVEL_WINDOW_S = 1800.0
"""The recent level is read from the last half hour: long enough to ignore a spike, short for shifts."""

LEVEL_MIN_STEPS = 3
"""Even on coarse steps the level uses at least three samples so one outlier cannot set it."""


def period_steps(period_s: float, step_s: float) -> int:
    """Steps in a period, or 0 when the step does not divide it into at least two steps."""
    m = round(period_s / step_s)
    return m if m >= 2 and abs(m * step_s - period_s) <= 0.01 * step_s * m else 0


def ffill(y: FloatArray) -> FloatArray:
    """Forward-fill NaN with the last valid value; leading NaN become the first valid value."""
    valid = ~np.isnan(y)
    if not valid.any():
        return np.zeros_like(y)
    idx = np.where(valid, np.arange(y.size), 0)
    np.maximum.accumulate(idx, out=idx)
    out = y[idx]
    first = int(np.argmax(valid))
    out[:first] = y[first]
    return out


def last_valid(y: FloatArray, ends: IntArray) -> FloatArray:
    """The last non-NaN value of each `y[:end]` (0 when there is none); cheap for a few live origins."""
    if ends.size > 8:
        return ffill(y)[np.clip(ends - 1, 0, None)]
    out = np.zeros(ends.size)
    for i, e in enumerate(ends):
        lo = int(e)
        while lo > 0:
            chunk = y[max(0, lo - 256) : lo]
            ok = np.flatnonzero(~np.isnan(chunk))
            if ok.size:
                out[i] = chunk[ok[-1]]
                break
            lo -= 256
    return out


class Model(ABC):
    """A central-path model: `fit` learns slow state, `predict` reads each origin's recent history."""

    name: str = ""
    min_history_steps: int = 1
    """Fewest steps of history the model needs before `fit`."""
    costly_fit: bool = False
    """True when `fit` is too slow to repeat for live forecasts after calibration (the per-series gbm)."""

    def fit(self, y: FloatArray, *, pos0: int) -> Model:
        """Learn slow-moving state from the history (default: nothing to learn)."""
        return self

    def fit_steps(self, y: FloatArray, *, pos0: int) -> Iterator[None]:
        """`fit` in slices of a few milliseconds, one per `yield`, for fits spread over live calls.

        The default is one slice; a costly model (the gbm) overrides it.
        """
        self.fit(y, pos0=pos0)
        yield

    @abstractmethod
    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        """Central paths, shape `(len(ends), horizon)`, each using only `y[:end]`; finite and >= 0."""


class SeasonalNaive(Model):
    """Repeat the last full period: `y[t + h - m]`, reaching one more period back over NaN."""

    def __init__(self, period: int, name: str) -> None:
        self.period = period
        self.name = name
        self.min_history_steps = period

    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        m = self.period
        h = np.arange(horizon)
        back = m * ((h // m) + 1)
        idx = ends[:, None] + h[None, :] - back[None, :]
        out = np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan)
        older = idx - m
        retry = np.isnan(out) & (older >= 0)
        out[retry] = y[older[retry]]
        miss = np.isnan(out)
        if miss.any():
            last = last_valid(y, ends)
            out[miss] = np.broadcast_to(last[:, None], out.shape)[miss]
        return np.maximum(out, 0.0)


class Naive(Model):
    """The last valid value, held flat."""

    name = "naive"

    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        last = last_valid(y, ends)
        return np.repeat(np.maximum(last, 0.0)[:, None], horizon, axis=1)


class RecentMax(Model):
    """The largest value seen over the last `window` steps (default: as many steps as the horizon)."""

    name = "recent_max"

    def __init__(self, window: int | None = None) -> None:
        self.window = window

    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        w = max(1, self.window or horizon)
        if ends.size <= 8:
            peak = np.array([_nanmax(y[max(0, int(e) - w) : int(e)]) for e in ends])
        else:
            peak = rolling_max(y, w)[np.clip(ends - 1, 0, None)]
        if np.isnan(peak).any():
            peak = np.where(np.isnan(peak), last_valid(y, ends), peak)
        return np.repeat(np.maximum(peak, 0.0)[:, None], horizon, axis=1)


def _nanmax(x: FloatArray) -> float:
    ok = x[~np.isnan(x)]
    return float(ok.max()) if ok.size else float("nan")


def rolling_max(y: FloatArray, window: int) -> FloatArray:
    """`out[i] = nanmax(y[i - window + 1 : i + 1])`, NaN where the window holds no value."""
    z = np.where(np.isnan(y), -np.inf, y)
    if window > 1:
        pad = np.concatenate([np.full(window - 1, -np.inf), z])
        z = np.lib.stride_tricks.sliding_window_view(pad, window).max(axis=1)
    return np.where(np.isneginf(z), np.nan, z)


class SeasonalProfile(Model):
    """Level times a robust seasonal profile of period `period` steps (a day or a week)."""

    def __init__(
        self, period: int, name: str, *, step_s: float, level_window_steps: int | None = None
    ) -> None:
        self.period = period
        self.name = name
        self.step_s = step_s
        self.level_window_steps = level_window_steps
        self.min_history_steps = 2 * period

    def fit(self, y: FloatArray, *, pos0: int) -> SeasonalProfile:
        m = self.period
        n_periods = min(PROFILE_MAX_PERIODS, y.size // m)
        if n_periods < 2:
            raise errors.InsufficientHistory(
                f"{self.name} needs two periods of {m} steps, got {y.size} steps"
            )
        tail = y[-n_periods * m :]
        tail_pos0 = pos0 + y.size - n_periods * m
        # Rows start at phase 0 so that column j is phase j; the shift aligns the tail with the phase.
        shift = tail_pos0 % m
        rows = np.concatenate([np.full(shift, np.nan), tail, np.full(m - shift, np.nan)]).reshape(-1, m)
        finite = tail[~np.isnan(tail)]
        self.offset_ = float(0.05 * np.mean(finite)) + 1e-6 if finite.size else 1.0
        c = self.offset_
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            level = np.nanmedian(rows, axis=1)
            keep = ~np.isnan(level)
            norm = (rows[keep] + c) / (level[keep, None] + c)
            prof = np.nanmedian(norm, axis=0) if keep.any() else np.ones(m)
        prof = np.where(np.isnan(prof), 1.0, prof)
        w = max(1, round(PROFILE_SMOOTH_S / self.step_s))
        if w > 1 and w < m:
            k = np.ones(w) / w
            ext = np.concatenate([prof[-(w // 2) :], prof, prof[: w - 1 - w // 2]])
            prof = np.convolve(ext, k, mode="valid")
        # Scale so the profile is in units of the series: S = profile * typical level.
        typical = float(np.nanmedian(level)) if keep.any() else 1.0
        self.profile_ = np.maximum((prof * (typical + c)) - c, 0.0)
        return self

    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        m, c, prof = self.period, self.offset_, self.profile_
        k = self.level_window_steps or max(LEVEL_MIN_STEPS, round(LEVEL_WINDOW_S / self.step_s))
        k = int(min(k, max(1, y.size)))
        # Ratios over the last k samples of each origin (NaN where missing or before the start).
        idx = ends[:, None] - k + np.arange(k)[None, :]
        ok = idx >= 0
        vals = np.where(ok, y[np.clip(idx, 0, None)], np.nan)
        seas = prof[(pos0 + np.clip(idx, 0, None)) % m]
        ratio = row_nanmedian((vals + c) / (seas + c))
        ratio = np.where(np.isnan(ratio), 1.0, ratio)
        future = prof[(pos0 + ends[:, None] + np.arange(horizon)[None, :]) % m]
        out: FloatArray = np.maximum(ratio[:, None] * (future + c) - c, 0.0)
        return out


def row_nanmedian(a: FloatArray) -> FloatArray:
    """`np.nanmedian(a, axis=1)` (NaN for an all-NaN row), without its masked-array path on the common cases.

    The controller calls `predict` for one live origin per policy at every new sample; numpy's nanmedian
    goes through `numpy.ma` and cost about half of that call, while the row usually has no NaN at all.
    """
    nan = np.isnan(a)
    if not nan.any():
        out: FloatArray = np.median(a, axis=1)
        return out
    if a.shape[0] > 8:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            full: FloatArray = np.nanmedian(a, axis=1)
        return full
    rows = np.full(a.shape[0], np.nan)
    for i in range(a.shape[0]):
        ok = a[i][~nan[i]]
        if ok.size:
            rows[i] = np.median(ok)
    return rows


class MedianOf(Model):
    """The per-step median of several models' central paths: a combination robust to one model's miss.

    Fixed combinations beat per-series selection when the selection's own backtest is short and noisy
    (the M4 competition's lesson, and ours: on M4 Hourly's validation fold the median of seasonal naive
    by day and week and the global gbm beat `auto`'s pick, see BENCHMARKS.md). Components that cannot
    fit (too little history) are left out; at least one must fit.
    """

    def __init__(self, components: list[Model], name: str) -> None:
        self.components = components
        self.name = name
        self.min_history_steps = min((m.min_history_steps for m in components), default=1)
        self.costly_fit = any(m.costly_fit for m in components)

    def fit(self, y: FloatArray, *, pos0: int) -> MedianOf:
        for _ in self.fit_steps(y, pos0=pos0):
            pass
        return self

    def fit_steps(self, y: FloatArray, *, pos0: int) -> Iterator[None]:
        fitted: list[Model] = []
        for m in self.components:
            if y.size < m.min_history_steps:
                continue
            try:
                yield from m.fit_steps(y, pos0=pos0)
            except errors.InsufficientHistory:
                continue
            fitted.append(m)
        if not fitted:
            raise errors.InsufficientHistory(f"{self.name}: no component could fit {y.size} steps")
        self.fitted_ = fitted

    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        paths = [m.predict(y, ends, horizon, pos0=pos0) for m in self.fitted_]
        out: FloatArray = np.median(np.stack(paths), axis=0)
        return out


def baseline_models(step_s: float) -> list[Model]:
    """The baselines every backtest reports: seasonal naive (day, week) and recent max."""
    out: list[Model] = []
    day, week = period_steps(DAY_S, step_s), period_steps(WEEK_S, step_s)
    if day:
        out.append(SeasonalNaive(day, "snaive_day"))
    if week:
        out.append(SeasonalNaive(week, "snaive_week"))
    out.append(RecentMax())
    return out


def candidate_models(step_s: float, n_steps: int, *, season_steps: tuple[int, ...] = ()) -> list[Model]:
    """Models `auto` chooses among for a history of `n_steps`: those with enough data to fit."""
    periods = list(season_steps) or [
        p for p in (period_steps(DAY_S, step_s), period_steps(WEEK_S, step_s)) if p
    ]
    out: list[Model] = [Naive(), RecentMax()]
    for p in periods:
        tag = {period_steps(DAY_S, step_s): "day", period_steps(WEEK_S, step_s): "week"}.get(p, str(p))
        out.append(SeasonalNaive(p, f"snaive_{tag}"))
        out.append(SeasonalProfile(p, f"profile_{tag}", step_s=step_s))
    return [m for m in out if n_steps >= m.min_history_steps]
