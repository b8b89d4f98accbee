"""The Forecaster: fit a demand history, fold in new samples, forecast quantiles of the peak.

This is the one interface the controller and the simulator use (through `controller.forecasting`). It keeps the
history on a regular grid, fits the candidate models, and for each horizon it is asked about runs a
rolling-origin backtest over the recent history: that backtest both picks the model (`auto` keeps the one,
or the equal blend of the best two or three, with the lowest out-of-sample pinball loss of the peak; or
with `selection="path"` the lowest MAE of the central path) and calibrates its quantiles by split
conformal prediction (`forecast.calibration`). The result is cached per horizon, so the
controller's steady state (`update` every 15-30 s, then `forecast` at the same horizon) costs one central
path and a few array additions. Every `refit_every_s` of new data the models are refitted and the
calibrations recomputed, in slices of a few milliseconds, one per following `forecast` call, while the
previous fit keeps answering (`_start_refit`): a refit never stalls the call that happens to trigger it.
The slices are counted in calls, not timed, so a forecaster stays deterministic (the simulator relies on it).

Short histories (too short for enough calibration origins) fall back to the recent maximum with a band
widened by the recent spread, labelled `recent_max_fallback`. Candidates: naive, recent max, seasonal
naive and robust seasonal profile per period (a day and a week when the step divides them and the history
holds two periods), and the gradient-boosted model (`forecast.gbm`) once there is enough history to train
it, or a shared `GlobalGBM` passed as `global_model`.

It does not read clocks or files or talk to anything: timestamps come in with the data.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Self

import numpy as np
import numpy.typing as npt

from forecast import calibration, models, series
from forecast.errors import InsufficientHistory, NotFittedError

FloatArray = npt.NDArray[np.float64]

MODEL_NAMES = (
    "auto",
    "naive",
    "recent_max",
    "snaive_day",
    "snaive_week",
    "profile_day",
    "profile_week",
    "gbm",
    "median",
)
"""Accepted `model` values: `auto`, or one model forced; `median` is the per-step median of seasonal naive
by day and by week and the gbm (`models.MedianOf`), never among `auto`'s candidates."""

MIN_POINTS = 3
"""Fewer valid samples than this is too short for any model, even the fallback."""

HISTORY_S = 5 * models.WEEK_S
"""History kept: four weeks for a weekly profile plus calibration; older samples are dropped."""

CALIBRATION_S = 2 * models.DAY_S
"""Recent span whose origins calibrate and rank the models: two days see both peaks and troughs."""

MAX_ORIGINS = 300
"""Calibration origins per horizon, evenly spaced: enough for a 95% quantile, cheap to recompute."""

COSTLY_REFIT_S = models.DAY_S
"""The per-series gbm is refitted daily, not at every hourly refit: the cheap models and the calibration
follow the last hour, the trees learn slow structure, and skipping their fit keeps the hourly refit cheap."""

PREDICT_SLICE_ROWS = 500
"""Rows a costly model (the gbm) predicts in one slice of a sliced recalibration: a few milliseconds."""

FALLBACK_BAND = 2.0
"""The fallback's band is this many recent spreads per unit of normal quantile: deliberately wide."""


@dataclass(frozen=True)
class ForecastResult:
    """Quantile forecasts over the next `horizon_steps` steps after `origin_s`."""

    paths: dict[float, FloatArray]
    """Per-step q-quantile path, shape `(horizon_steps,)`, finite and >= 0."""
    peak: dict[float, float]
    """The q-quantile of max(demand) over the horizon, >= the largest per-step value of `paths[q]`."""
    model: str
    horizon_steps: int
    step_s: float
    origin_s: float
    """Unix time of the last sample; step i of a path is at `origin_s + (i + 1) * step_s`."""
    center: FloatArray | None = None
    """The model's central path before calibration: its point forecast (M4-style scoring uses it; the
    calibrated median `paths[0.5]` also shifts it by the median of recent errors, which costs accuracy
    when those errors were measured in sample, as a global model's are)."""


@dataclass
class _HorizonFit:
    model: str
    components: list[models.Model]
    calib: calibration.Calibration | None
    scores: dict[str, float]


class Forecaster:
    """Calibrated quantile forecasts of a demand series' peak, scikit-learn style.

    Args:
        model: `auto` (pick or blend by backtest) or one of `MODEL_NAMES`.
        step_s: the series' step in seconds.
        horizon_steps: optional horizon to calibrate for during `fit` (otherwise on first `forecast`).
        season_steps: seasonal periods in steps (default: a day and a week, when the step divides them).
        refit_every_s: how much new data `update` folds in before models are refitted and recalibrated.
        global_model: a fitted `forecast.gbm.GlobalGBM` to use as the `gbm` candidate instead of fitting one
            on this series alone.
        selection: what `auto` ranks models by: `peak` (out-of-sample pinball loss of the calibrated peak,
            what the controller needs) or `path` (MAE of the central path, for point forecasts such as M4).
    """

    def __init__(
        self,
        model: str = "auto",
        step_s: float = 60.0,
        *,
        horizon_steps: int | None = None,
        season_steps: tuple[int, ...] = (),
        refit_every_s: float = 3600.0,
        history_s: float = HISTORY_S,
        calibration_s: float = CALIBRATION_S,
        max_origins: int = MAX_ORIGINS,
        global_model: object | None = None,
        selection: str = "peak",
    ) -> None:
        self.model = model
        self.step_s = step_s
        self.horizon_steps = horizon_steps
        self.season_steps = season_steps
        self.refit_every_s = refit_every_s
        self.history_s = history_s
        self.calibration_s = calibration_s
        self.max_origins = max_origins
        self.global_model = global_model
        self.selection = selection

    # -- public API -------------------------------------------------------------------------------------------

    def fit(self, timestamps: object, values: object) -> Self:
        """Learn from a history (unix seconds on a regular step; NaN and gaps allowed).

        Raises:
            ValueError: bad shapes, non-increasing or off-grid timestamps, negative values, all NaN, or
                fewer than `MIN_POINTS` valid samples; an unknown `model` or a bad `step_s`.
        """
        self._check_params()
        ts, vs = series.check_arrays(timestamps, values)
        _, grid = series.to_grid(ts, vs, self.step_s, origin_s=float(ts[0]))
        self.origin_s_ = float(ts[0])
        self.pos0_ = round(self.origin_s_ / self.step_s)
        self.y_ = grid
        self.costly_fits_: dict[tuple[int, str], tuple[models.Model, float]] = {}
        self._trim()
        self._refit()
        if self.horizon_steps is not None:
            self._horizon_fit(self.horizon_steps)
        return self

    def update(self, timestamps: object, values: object) -> Self:
        """Fold in new samples; samples at already-known times overwrite them (late corrections).

        Cheap: the models are refitted only after `refit_every_s` of new data.
        """
        self._check_fitted()
        ts = np.asarray(timestamps, dtype=np.float64)
        if ts.size == 0 and np.asarray(values).size == 0:
            return self
        ts, vs = series.check_arrays(ts, values)
        pos = (ts - self.origin_s_) / self.step_s
        idx = np.rint(pos)
        off = np.abs(pos - idx)
        if np.any(off > series.GRID_TOLERANCE):
            i = int(np.argmax(off > series.GRID_TOLERANCE))
            raise ValueError(
                f"update timestamps are not on the fitted step of {self.step_s} s: sample {i} at {ts[i]!r} "
                f"is {off[i] * self.step_s:.3f} s off the grid that starts at {self.origin_s_!r}"
            )
        idx_i = idx.astype(np.int64)
        keep = idx_i >= 0
        idx_i, vs = idx_i[keep], vs[keep]
        if idx_i.size == 0:
            return self
        n_old = self.y_.size
        n_new = max(n_old, int(idx_i[-1]) + 1)
        if n_new > n_old:
            self.y_ = np.concatenate([self.y_, np.full(n_new - n_old, np.nan)])
        self.y_[idx_i] = vs
        self.steps_since_fit_ += n_new - n_old
        if n_new > n_old:
            self._trim()
        if self.steps_since_fit_ * self.step_s >= self.refit_every_s:
            self._start_refit()
        return self

    def forecast(self, horizon_steps: int, quantiles: Sequence[float] = (0.95,)) -> ForecastResult:
        """Quantile paths and peak quantiles over the next `horizon_steps` steps.

        Raises:
            NotFittedError: before `fit`.
            ValueError: `horizon_steps` not a positive integer, or a quantile outside (0, 1).
        """
        self._check_fitted()
        if (
            isinstance(horizon_steps, bool)
            or not isinstance(horizon_steps, int | np.integer)
            or horizon_steps < 1
        ):
            raise ValueError(f"horizon_steps must be a positive integer, got {horizon_steps!r}")
        qs = _check_quantiles(quantiles)
        hf = self._horizon_fit(int(horizon_steps))
        ends = np.array([self.y_.size], dtype=np.int64)
        last_valid = float(self.y_[~np.isnan(self.y_)][-1]) if np.any(~np.isnan(self.y_)) else 0.0
        if hf.calib is None:
            paths, peaks = _fallback(self.y_, int(horizon_steps), qs, last_valid)
            center = _fallback(self.y_, int(horizon_steps), (0.5,), last_valid)[0][0.5]
        else:
            center = np.mean(
                [m.predict(self.y_, ends, int(horizon_steps), pos0=self.pos0_)[0] for m in hf.components],
                axis=0,
            )
            paths, peaks = hf.calib.quantiles(center, qs)
        self.model_name_ = hf.model
        origin = self.origin_s_ + (self.y_.size - 1) * self.step_s
        return ForecastResult(
            paths={q: paths[q] for q in qs},
            peak={q: peaks[q] for q in qs},
            model=hf.model,
            horizon_steps=int(horizon_steps),
            step_s=self.step_s,
            origin_s=origin,
            center=center,
        )

    def __getstate__(self) -> dict[str, object]:
        """Pickling completes any recalibration under way (a half-run generator cannot be pickled)."""
        state = dict(self.__dict__)
        if state.get("pending_"):
            for horizon, steps in list(self.pending_.items()):
                self.horizons_[horizon] = self._finish(steps)
            self.pending_.clear()
        return state

    # -- internals used by forecast.backtest ------------------------------------------------------------------

    def _horizon_fit(self, horizon: int) -> _HorizonFit:
        pending = self.pending_.get(horizon)
        if pending is not None:
            # One slice of the running recalibration; the previous fit serves until it completes.
            try:
                next(pending)
            except StopIteration as done:
                del self.pending_[horizon]
                self.horizons_[horizon] = done.value
        hf = self.horizons_.get(horizon)
        if hf is None:
            hf = self._calibrate(horizon)
            self.horizons_[horizon] = hf
            self.model_name_ = hf.model
        return hf

    def _start_refit(self) -> None:
        """The refit `update` asks for, spread over the next forecasts instead of stalling one of them.

        Each horizon already served keeps its fit (its models predict from the newest samples, only the
        calibration and the cheap models' seasonal state are an hour older) while its recalibration runs
        a slice per `forecast` call; a dozen or so calls complete it, well before the next refit is due.
        A recalibration still running when the next refit comes due is finished at once first, so the
        fit served is never more than two refit periods old however updates are batched.
        """
        for horizon, steps in list(self.pending_.items()):
            self.horizons_[horizon] = self._finish(steps)
        served = self.horizons_
        self._refit()
        for horizon, hf in served.items():
            self.horizons_[horizon] = hf
            self.pending_[horizon] = self._calibration_steps(horizon)

    @staticmethod
    def _finish(steps: Generator[None, None, _HorizonFit]) -> _HorizonFit:
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: _HorizonFit = done.value
                return result

    def _refit(self) -> None:
        y = self.y_
        n_valid = int(np.sum(~np.isnan(y)))
        if n_valid == 0:
            raise ValueError("all values are NaN: nothing to learn from")
        if n_valid < MIN_POINTS:
            raise ValueError(
                f"series too short for any model: {n_valid} valid samples, need at least {MIN_POINTS}"
            )
        self.horizons_: dict[int, _HorizonFit] = {}
        self.pending_: dict[int, Generator[None, None, _HorizonFit]] = {}
        """Recalibrations under way, advanced one slice per `forecast` (see `_start_refit`)."""
        self.steps_since_fit_ = 0
        self.model_name_ = "recent_max_fallback"

    def _candidates(self, n_steps: int, horizon: int) -> list[models.Model]:
        cands = models.candidate_models(self.step_s, n_steps, season_steps=self.season_steps)
        gbm = self._gbm_candidate(n_steps, horizon)
        if gbm is not None:
            cands.append(gbm)
        if self.model == "median":
            parts = [m for m in cands if m.name in ("snaive_day", "snaive_week", "gbm")]
            return [models.MedianOf(parts, "median")] if parts else []
        if self.model != "auto":
            cands = [m for m in cands if m.name == self.model]
        return cands

    def _gbm_candidate(self, n_steps: int, horizon: int) -> models.Model | None:
        if self.model not in ("auto", "gbm", "median"):
            return None
        from forecast import gbm  # scikit-learn loads only when a gbm is wanted

        return gbm.candidate(
            self.step_s,
            n_steps,
            horizon=horizon,
            global_model=self.global_model,
            season_steps=self.season_steps,
        )

    def _calibrate(self, horizon: int) -> _HorizonFit:
        """The whole calibration at once (first forecast at a horizon, `fit`, the backtest)."""
        return self._finish(self._calibration_steps(horizon))

    def _calibration_steps(self, horizon: int) -> Generator[None, None, _HorizonFit]:
        """The calibration as slices of work: each `yield` ends one slice of a few milliseconds.

        It reads a snapshot of the history taken when it starts, so later updates (and late corrections
        written in place) cannot change the data under a half-done calibration; models index absolute
        positions, so the fit it returns predicts on whatever history the forecaster holds by then.
        """
        y, pos0 = self.y_.copy(), self.pos0_
        n = y.size
        desired = max(round(self.calibration_s / self.step_s), 3 * horizon + calibration.MIN_ORIGINS)
        least = horizon + 4 * calibration.MIN_ORIGINS
        # Leave the most demanding (cheap) model that can fit enough history before the calibration span.
        needs = [
            m.min_history_steps
            for m in models.candidate_models(self.step_s, n, season_steps=self.season_steps)
            if (self.model in ("auto", m.name)) and m.min_history_steps <= n - least
        ]
        cal_len = max(least, min(desired, n - max(needs))) if needs else min(desired, n // 2)
        first_end = n - cal_len
        last_end = n - horizon
        cands = [m for m in self._candidates(first_end, horizon) if first_end >= m.min_history_steps]
        if last_end - first_end + 1 < calibration.MIN_ORIGINS or not cands:
            return _HorizonFit("recent_max_fallback", [], None, {})
        count = min(self.max_origins, last_end - first_end + 1)
        ends = np.unique(np.linspace(first_end, last_end, count).round().astype(np.int64))
        actuals = y[ends[:, None] + np.arange(horizon)[None, :]]
        usable = ~np.all(np.isnan(actuals), axis=1)
        ends, actuals = ends[usable], actuals[usable]
        if ends.size < calibration.MIN_ORIGINS:
            return _HorizonFit("recent_max_fallback", [], None, {})
        head = y[:first_end]
        centers: dict[str, FloatArray] = {}
        fitted: dict[str, models.Model] = {}
        head_end_s = self.origin_s_ + first_end * self.step_s
        for m in cands:
            cached = self.costly_fits_.get((horizon, m.name)) if m.costly_fit else None
            if cached is not None and head_end_s - cached[1] < COSTLY_REFIT_S:
                m = cached[0]  # fitted on older data only: no leak into this calibration
            else:
                try:
                    yield from m.fit_steps(head, pos0=pos0)
                except InsufficientHistory:
                    continue
                if m.costly_fit:
                    self.costly_fits_[(horizon, m.name)] = (m, head_end_s)
            if m.costly_fit:
                # A costly model predicts slowly too: a few hundred rows per slice.
                chunk = max(1, PREDICT_SLICE_ROWS // horizon)
                parts = []
                for i in range(0, ends.size, chunk):
                    parts.append(m.predict(y, ends[i : i + chunk], horizon, pos0=pos0))
                    yield
                centers[m.name] = np.concatenate(parts)
            else:
                centers[m.name] = m.predict(y, ends, horizon, pos0=pos0)
                yield
            fitted[m.name] = m
        if not centers:
            return _HorizonFit("recent_max_fallback", [], None, {})
        scores = {name: self._selection_loss(c, actuals) for name, c in centers.items()}
        ranked = sorted(scores, key=scores.__getitem__)
        choice, best = [ranked[0]], scores[ranked[0]]
        if self.model == "auto":
            # Equal-weight blends of the best two and three: combinations beat single picks on noisy ranks.
            for k in (2, 3):
                if len(ranked) < k:
                    break
                b_name = f"blend({','.join(ranked[:k])})"
                centers[b_name] = np.mean([centers[r] for r in ranked[:k]], axis=0)
                scores[b_name] = self._selection_loss(centers[b_name], actuals)
                if scores[b_name] < best:
                    choice, best = ranked[:k], scores[b_name]
        name = name_of(choice)
        calib = calibration.Calibration.fit(centers[name], actuals)
        comps = [fitted[c] for c in choice]
        # Refit the chosen models on the whole history for live forecasts (the profile sees the last days);
        # the gradient-boosted model keeps its calibration-time fit, which is the costly one.
        yield
        for m in comps:
            if not m.costly_fit:
                m.fit(y, pos0=pos0)
                yield
        return _HorizonFit(name, comps, calib, scores)

    def _selection_loss(self, centers: FloatArray, actuals: FloatArray) -> float:
        if self.selection == "path":
            # Point accuracy of the central path on the newer origins (M4-style use).
            cut = round(centers.shape[0] * calibration.SELECTION_SPLIT)
            return float(np.nanmean(np.abs(centers[cut:] - actuals[cut:])))
        return min(calibration.split_loss(centers, actuals, power=p) for p in calibration.POWERS)

    def _trim(self) -> None:
        keep = round(self.history_s / self.step_s)
        extra = self.y_.size - keep
        if extra > keep // 4:
            self.y_ = self.y_[extra:].copy()
            self.origin_s_ += extra * self.step_s
            self.pos0_ += extra

    def _check_fitted(self) -> None:
        if not hasattr(self, "y_"):
            raise NotFittedError("this Forecaster is not fitted yet: call fit(timestamps, values) first")

    def _check_params(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}; got {self.model!r}")
        if not (isinstance(self.step_s, int | float) and math.isfinite(self.step_s) and self.step_s > 0):
            raise ValueError(f"step_s must be a positive number of seconds, got {self.step_s!r}")
        if self.horizon_steps is not None and (
            not isinstance(self.horizon_steps, int) or self.horizon_steps < 1
        ):
            raise ValueError(f"horizon_steps must be a positive integer or None, got {self.horizon_steps!r}")
        if self.selection not in ("peak", "path"):
            raise ValueError(f"selection must be 'peak' or 'path', got {self.selection!r}")
        if self.refit_every_s <= 0 or self.history_s <= 0 or self.calibration_s <= 0 or self.max_origins < 1:
            raise ValueError("refit_every_s, history_s, calibration_s and max_origins must be positive")


def name_of(choice: Sequence[str]) -> str:
    """A model's name, or `blend(a,b,...)` for an equal-weight blend."""
    return choice[0] if len(choice) == 1 else f"blend({','.join(choice)})"


def _check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    try:
        qs = tuple(float(q) for q in quantiles)
    except TypeError as exc:
        raise ValueError(f"quantiles must be a sequence of numbers in (0, 1), got {quantiles!r}") from exc
    if not qs:
        raise ValueError("quantiles must not be empty")
    bad = [q for q in qs if not 0.0 < q < 1.0]
    if bad:
        raise ValueError(f"quantiles must lie strictly between 0 and 1, got {bad}")
    return qs


def _fallback(
    y: FloatArray, horizon: int, quantiles: Sequence[float], last_valid: float
) -> tuple[dict[float, FloatArray], dict[float, float]]:
    """Robust recent max with a wide band: for histories too short to calibrate anything."""
    window = y[-max(horizon, 2 * MIN_POINTS) :]
    finite = window[~np.isnan(window)]
    if finite.size == 0:
        finite = np.array([last_valid])
    base = float(finite.max())
    spread = float(np.std(finite)) + math.sqrt(max(base, 0.0)) + 0.1 * base
    paths: dict[float, FloatArray] = {}
    peaks: dict[float, float] = {}
    for q in sorted(quantiles):
        z = NormalDist().inv_cdf(q)
        value = max(0.0, base + FALLBACK_BAND * z * spread)
        paths[q] = np.full(horizon, value)
        peaks[q] = value
    return paths, peaks
