"""Gradient-boosted quantile regression on lags, rolling statistics, seasonal lags and calendar features.

One `HistGradientBoostingRegressor(loss="quantile")` predicts the demand `h` steps ahead from what is known
at the origin, for every `h` up to the horizon (the step ahead is itself a feature: a direct multi-horizon
model, no recursion to compound errors). Everything is divided by the origin's recent mean level, so the
same trees serve a busy and a quiet hour, and, fitted on many series at once (`GlobalGBM`), different
series: that is the "global" model, which learns shapes a single short series cannot teach it.

The regressor predicts the median (`GBM_QUANTILE`); the stated quantiles and the peak come from conformal
calibration like every other model, so coverage is measured, not assumed from the loss.

Features, per (origin, step ahead): recent lags; the value one and two periods before the target time
(same time yesterday, last week); the robust seasonal profile's path; means, max and spread of the last
hour and day; target time of day (sin, cos) and day of week; the step ahead. All computed with arrays over
many origins at once.

It does not extrapolate beyond the level range it saw scaled (trees are flat outside the data); the
conformal band and `auto`'s backtest catch the cases where that matters.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from forecast import errors, models

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

GBM_QUANTILE = 0.5
"""The regressor's own quantile: the central path, calibrated afterwards."""

MIN_TRAIN_ORIGINS = 200
"""Fewer training origins than this and boosting overfits; the candidate is skipped."""

MAX_TRAIN_ROWS = 2000
"""Rows sampled per fit: with the trees below, a 14-day 1-minute fit stays near half a second on a busy core
(4,000 rows and 100 trees took 0.8 s for no better backtest score)."""

GBM_PARAMS = {"max_iter": 50, "learning_rate": 0.2, "max_leaf_nodes": 31, "min_samples_leaf": 20}
"""Small, regularised trees: the features carry the structure, depth would memorise noise."""

GLOBAL_GBM_PARAMS = {"max_iter": 300, "learning_rate": 0.05, "max_leaf_nodes": 63, "min_samples_leaf": 20}
"""Across hundreds of series there is data for more and larger trees (M4 Hourly: OWA 0.50 vs 0.53)."""

GLOBAL_PERIODS_BACK = 7
"""A global model sees the target's phase in each of the last 7 days (and 3 weeks) and their median: with
hundreds of series to learn from, the extra columns pay (M4 Hourly validation fold, uncalibrated central
path: OWA 0.516 against 0.526 with the per-series model's 2). The per-series model keeps 2: its few
thousand rows cannot learn that many columns."""

LAGS = (1, 2, 3, 4, 6, 12)
"""Steps back read as lags (capped to the history available)."""


class FeatureSpec:
    """What the features of a series with this step and these periods look like."""

    def __init__(self, step_s: float, periods: Sequence[int], *, periods_back: int = 2) -> None:
        self.step_s = step_s
        self.periods = tuple(p for p in periods if p >= 2)
        self.periods_back = periods_back
        day = models.period_steps(models.DAY_S, step_s)
        self.day = day or (self.periods[0] if self.periods else 24)
        self.week = models.period_steps(models.WEEK_S, step_s)
        self.hour = max(1, round(3600.0 / step_s))

    def build(
        self,
        yf: FloatArray,
        csum: FloatArray,
        ends: IntArray,
        rows: IntArray,
        hs: IntArray,
        *,
        pos0: int,
        profile_paths: FloatArray | None,
    ) -> tuple[FloatArray, FloatArray]:
        """Feature rows and scales for (ends[rows[i]], hs[i]) (hs 1-based).

        `yf` is the forward-filled history and `csum` its cumulative sum with a leading 0; per-origin
        features are computed once per origin and shared by its rows.
        """
        level_w = np.minimum(self.day, ends)
        level = (csum[ends] - csum[ends - level_w]) / np.maximum(level_w, 1)
        floor = 1e-3 + 1e-3 * float(np.mean(np.abs(yf[-self.day :])))
        scale_o = np.maximum(level, floor)
        per_origin: list[FloatArray] = [yf[np.maximum(ends - lag, 0)] / scale_o for lag in LAGS]
        for w in (self.hour, self.day):
            ww = np.minimum(w, ends)
            per_origin.append((csum[ends] - csum[ends - ww]) / np.maximum(ww, 1) / scale_o)
        win = min(self.hour, 60)
        recent = yf[np.maximum(ends[:, None] - win + np.arange(win)[None, :], 0)]
        per_origin.append(recent.max(axis=1) / scale_o)
        per_origin.append(recent.std(axis=1) / scale_o)
        per_origin.append(np.log1p(level))
        origin_x = np.column_stack(per_origin)[rows]
        scale = scale_o[rows]
        e = ends[rows]
        target = e + hs - 1
        cols: list[FloatArray] = []
        for i, p in enumerate(self.periods):
            back = []
            for k in range(1, (self.periods_back if i == 0 else min(self.periods_back, 3)) + 1):
                idx = target - k * p
                idx = np.where(idx >= e, idx - p * np.ceil((idx - e + 1) / p).astype(np.int64), idx)
                back.append(np.where(idx >= 0, yf[np.maximum(idx, 0)], np.nan) / scale)
            cols.extend(back)
            if len(back) > 2:
                # The median of the same phase over past periods: a robust seasonal level for the trees.
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    cols.append(np.nanmedian(np.column_stack(back), axis=1))
        if profile_paths is not None:
            cols.append(profile_paths[rows, hs - 1] / scale)
        phase = ((pos0 + target) % self.day) / self.day
        cols.append(np.sin(2 * np.pi * phase))
        cols.append(np.cos(2 * np.pi * phase))
        if self.week:
            cols.append((((pos0 + target) // self.day) % 7).astype(np.float64))
        cols.append(hs.astype(np.float64))
        return np.column_stack([origin_x, *cols]), scale


def _prepare(y: FloatArray) -> tuple[FloatArray, FloatArray]:
    yf = models.ffill(y)
    return yf, np.concatenate([[0.0], np.cumsum(yf)])


def _profile(spec: FeatureSpec, y: FloatArray, pos0: int) -> models.SeasonalProfile | None:
    period = spec.week if spec.week and y.size >= 3 * spec.week else spec.day
    if y.size < 2 * period:
        return None
    return models.SeasonalProfile(period, "profile", step_s=spec.step_s).fit(y, pos0=pos0)


def _training_rows(
    spec: FeatureSpec,
    y: FloatArray,
    pos0: int,
    horizon: int,
    *,
    rows: int,
    rng: np.random.Generator,
) -> tuple[FloatArray, FloatArray] | None:
    lo, hi = max(spec.day, 24), y.size - horizon
    if hi - lo < MIN_TRAIN_ORIGINS // 4:
        return None
    per_origin = min(horizon, 8)
    n_orig = max(1, min(hi - lo, rows // per_origin))
    ends = np.sort(rng.choice(np.arange(lo, hi), size=n_orig, replace=False)).astype(np.int64)
    hs = rng.integers(1, horizon + 1, size=(n_orig, per_origin)).astype(np.int64)
    hs[:, 0] = 1
    # The profile sees the whole training history, targets included: one value among the medians of
    # several periods, a small leak accepted to avoid refitting a profile per origin.
    prof = _profile(spec, y, pos0)
    ppaths = prof.predict(y, ends, horizon, pos0=pos0) if prof is not None else None
    rows_o = np.repeat(np.arange(n_orig, dtype=np.int64), per_origin)
    hs_r = hs.ravel()
    yf, csum = _prepare(y)
    x, scale = spec.build(yf, csum, ends, rows_o, hs_r, pos0=pos0, profile_paths=ppaths)
    target = y[ends[rows_o] + hs_r - 1]
    # A column with no value at all (a lag older than every origin) breaks binning; zero carries no split.
    x[:, np.all(np.isnan(x), axis=0)] = 0.0
    ok = ~np.isnan(target)
    return x[ok], target[ok] / scale[ok]


_THREADPOOLS: list[object] = []


def _one_thread() -> Any:
    """A context keeping OpenMP to one thread: the controller runs many small fits side by side, and on a
    busy machine OpenMP's spinning threads make a 10 ms predict take seconds."""
    if not _THREADPOOLS:
        from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1, user_api="openmp")  # type: ignore[attr-defined]


def _regressor(random_state: int, params: dict[str, Any] = GBM_PARAMS) -> object:
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(
        loss="quantile", quantile=GBM_QUANTILE, random_state=random_state, **params
    )


class GBM(models.Model):
    """Per-series gradient-boosted median model, fitted on this series' own history."""

    name = "gbm"
    costly_fit = True

    def __init__(self, step_s: float, periods: Sequence[int], *, horizon: int, random_state: int = 0) -> None:
        self.periods = tuple(periods)
        self.spec = FeatureSpec(step_s, periods)
        self.horizon = horizon
        self.random_state = random_state
        self.min_history_steps = max(self.spec.day, 24) + MIN_TRAIN_ORIGINS + horizon

    def fit(self, y: FloatArray, *, pos0: int) -> GBM:
        for _ in self.fit_steps(y, pos0=pos0):
            pass
        return self

    def fit_steps(self, y: FloatArray, *, pos0: int) -> Iterator[None]:
        """The fit in two slices: the training rows, then the boosting.

        The boosting itself is one slice: scikit-learn's `warm_start` could add trees a few at a time, but
        each call re-bins the data, which costs as much as the trees it would spread.
        """
        # Seasonal lags need two periods of history; a week on a few days of data would be all NaN.
        self.spec = FeatureSpec(self.spec.step_s, [p for p in self.periods if 2 * p < y.size])
        rng = np.random.default_rng(self.random_state)
        data = _training_rows(self.spec, y, pos0, self.horizon, rows=MAX_TRAIN_ROWS, rng=rng)
        if data is None or data[0].shape[0] < MIN_TRAIN_ORIGINS:
            raise errors.InsufficientHistory("gbm: too little history to train")
        self.profile_ = _profile(self.spec, y, pos0)
        yield
        self.regressor_ = _regressor(self.random_state)
        with _one_thread():
            self.regressor_.fit(*data)  # type: ignore[attr-defined]
        self.forest_ = Forest(self.regressor_)
        yield

    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        return _predict(self.spec, self.regressor_, self.forest_, self.profile_, y, ends, horizon, pos0=pos0)


class GlobalGBM:
    """One gradient-boosted model fitted across many series (same step), used as every series' `gbm`."""

    def __init__(
        self,
        step_s: float,
        periods: Sequence[int],
        *,
        horizon: int,
        random_state: int = 0,
        periods_back: int = GLOBAL_PERIODS_BACK,
    ) -> None:
        self.step_s = step_s
        self.periods = tuple(periods)
        self.horizon = horizon
        self.random_state = random_state
        self.periods_back = periods_back

    def fit(self, histories: Sequence[FloatArray], *, rows_per_series: int = 2000) -> GlobalGBM:
        """Fit on many histories (each a regular grid starting at phase 0 of the day)."""
        longest = max((len(h) for h in histories), default=0)
        spec = FeatureSpec(
            self.step_s, [p for p in self.periods if 2 * p < longest], periods_back=self.periods_back
        )
        rng = np.random.default_rng(self.random_state)
        xs, ts = [], []
        for y in histories:
            data = _training_rows(
                spec, np.asarray(y, dtype=np.float64), 0, self.horizon, rows=rows_per_series, rng=rng
            )
            if data is not None:
                xs.append(data[0])
                ts.append(data[1])
        if not xs:
            raise ValueError("GlobalGBM.fit: no series long enough to train on")
        self.spec_ = spec
        self.regressor_ = _regressor(self.random_state, GLOBAL_GBM_PARAMS)
        with _one_thread():
            self.regressor_.fit(np.concatenate(xs), np.concatenate(ts))  # type: ignore[attr-defined]
        self.forest_ = Forest(self.regressor_)
        return self

    def model(self) -> models.Model:
        """A per-series view of the global regressor (its own seasonal profile, the shared trees)."""
        return _GlobalView(self)


class _GlobalView(models.Model):
    name = "gbm"

    def __init__(self, owner: GlobalGBM) -> None:
        self.owner = owner
        self.min_history_steps = max(owner.spec_.day, 24) + 1

    def fit(self, y: FloatArray, *, pos0: int) -> _GlobalView:
        self.profile_ = _profile(self.owner.spec_, y, pos0)
        return self

    def predict(self, y: FloatArray, ends: IntArray, horizon: int, *, pos0: int) -> FloatArray:
        owner = self.owner
        return _predict(
            owner.spec_, owner.regressor_, owner.forest_, self.profile_, y, ends, horizon, pos0=pos0
        )


def _predict(
    spec: FeatureSpec,
    regressor: object,
    forest: Forest | None,
    profile: models.SeasonalProfile | None,
    y: FloatArray,
    ends: IntArray,
    horizon: int,
    *,
    pos0: int,
) -> FloatArray:
    yf, csum = _prepare(y)
    n = ends.size
    rows = np.repeat(np.arange(n, dtype=np.int64), horizon)
    hs_r = np.tile(np.arange(1, horizon + 1, dtype=np.int64), n)
    pp = profile.predict(y, ends, horizon, pos0=pos0) if profile is not None else None
    x, scale = spec.build(yf, csum, ends, rows, hs_r, pos0=pos0, profile_paths=pp)
    pred = predict_rows(regressor, forest, x) * scale
    out: FloatArray = np.maximum(np.nan_to_num(pred, nan=0.0), 0.0).reshape(n, horizon)
    return out


FAST_PATH_CELLS = 5_000
"""Rows x trees up to which `Forest` evaluates the trees itself: the live forecast's few rows cost ~10 ms
in scikit-learn's `predict` (input validation and a Python loop over trees) and ~0.3 ms here; large
batches (calibration, M4) go through scikit-learn's compiled loop."""


class Forest:
    """A fitted `HistGradientBoostingRegressor`'s trees as flat arrays, walked for all trees at once.

    Reads scikit-learn's fitted predictors (`_predictors`, `_baseline_prediction`: private, but the same
    since the estimator appeared in 0.21); `tests/unit/test_forecast_models.py` checks it predicts what
    `regressor.predict` does, so a change there fails a test rather than the forecasts. Numeric features
    only, as built here; the loss must have the identity link (quantile, squared and absolute error).
    """

    def __init__(self, regressor: Any) -> None:
        trees = [it[0].nodes for it in regressor._predictors]
        sizes = np.array([t.size for t in trees], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        nodes = np.concatenate(trees)
        shift = np.repeat(offsets, sizes)
        self.roots_ = offsets
        self.left_ = nodes["left"].astype(np.int64) + shift
        self.right_ = nodes["right"].astype(np.int64) + shift
        self.feature_ = nodes["feature_idx"].astype(np.int64)
        self.threshold_ = nodes["num_threshold"].astype(np.float64)
        self.missing_left_ = nodes["missing_go_to_left"].astype(bool)
        self.leaf_ = nodes["is_leaf"].astype(bool)
        self.value_ = nodes["value"].astype(np.float64)
        self.depth_ = int(nodes["depth"].max()) if nodes.size else 0
        self.baseline_ = float(np.asarray(regressor._baseline_prediction).ravel()[0])

    def predict(self, x: FloatArray) -> FloatArray:
        """The regressor's prediction for each row of `x`."""
        node = np.broadcast_to(self.roots_, (x.shape[0], self.roots_.size)).copy()
        rows = np.arange(x.shape[0])[:, None]
        for _ in range(self.depth_):
            inner = ~self.leaf_[node]
            if not inner.any():
                break
            xv = x[rows, self.feature_[node]]
            left = np.where(np.isnan(xv), self.missing_left_[node], xv <= self.threshold_[node])
            node = np.where(inner, np.where(left, self.left_[node], self.right_[node]), node)
        out: FloatArray = self.baseline_ + self.value_[node].sum(axis=1)
        return out


def predict_rows(regressor: Any, forest: Forest | None, x: FloatArray) -> FloatArray:
    """`regressor.predict(x)`, through `forest` when the batch is small enough for it to be faster."""
    if forest is not None and x.shape[0] * forest.roots_.size <= FAST_PATH_CELLS:
        return forest.predict(x)
    with _one_thread():
        out: FloatArray = regressor.predict(x)
    return out


def candidate(
    step_s: float,
    n_steps: int,
    *,
    horizon: int,
    global_model: object | None,
    season_steps: tuple[int, ...],
) -> models.Model | None:
    """The gbm candidate for a series, or None when there is too little data to train one."""
    if isinstance(global_model, GlobalGBM):
        return global_model.model()
    periods = list(season_steps) or [
        p
        for p in (models.period_steps(models.DAY_S, step_s), models.period_steps(models.WEEK_S, step_s))
        if p
    ]
    m = GBM(step_s, periods, horizon=horizon)
    return m if n_steps >= m.min_history_steps else None
