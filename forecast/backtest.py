"""Rolling-origin backtests of peak forecasts, for the model and the baselines in the same run.

At each origin (every `origin_stride_steps` steps after the training span) the model forecasts the
q-quantile of the peak over the next `horizon_steps`, and the forecast is scored against the actual peak:
pinball loss, coverage (actual peak at or under the forecast), under-forecast rate, mean shortfall when
under (streams short), mean excess (over-provisioning), and the MAE of the central path. The baselines
(seasonal naive by day and week, recent max) are scored on the same origins as their raw peak
`max(path)`, which is how they would be used without this package.

To stay fast the Forecaster is refitted once per block of `refit_every_s` (a day by default, longer when
that would mean more than `MAX_REFITS` refits) on the data before the block, and its fitted models are then
run over all the block's origins at once; within a block the conformal calibration is redone every
`recalibrate_every_s` (a day) on the origins just before. The models only read `y[:origin]` and the
calibration only origins whose actuals precede the forecast origin, so nothing from the future leaks in.
In production the Forecaster refits and recalibrates hourly, so these figures are, if anything, slightly
pessimistic.

It does not plot or print: `forecast.cli` does that.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from forecast import calibration, forecaster, models, series

FloatArray = npt.NDArray[np.float64]


MAX_REFITS = 24
"""Refit blocks per backtest at most: on long series the blocks grow beyond a day to bound the runtime."""


@dataclass(frozen=True)
class Metrics:
    """Scores of one model's q-quantile peak forecasts over the backtest origins."""

    model: str
    pinball_peak: float
    coverage: float
    under_rate: float
    mean_shortfall: float
    """Mean of (actual peak - forecast) over the origins where the forecast was under."""
    mean_excess: float
    """Mean of (forecast - actual peak) over all origins, zero when under: over-provisioning."""
    path_mae: float
    origins: int


@dataclass(frozen=True)
class BacktestReport:
    horizon_steps: int
    step_s: float
    quantile: float
    model: Metrics
    baselines: list[Metrics]
    chosen: dict[str, int]
    """How many blocks `auto` picked each model for."""
    origin_s: FloatArray = field(repr=False)
    predicted_peak: FloatArray = field(repr=False)
    actual_peak: FloatArray = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for k in ("origin_s", "predicted_peak", "actual_peak"):
            d.pop(k)
        return d


def score(
    name: str,
    predicted_peak: FloatArray,
    actual_peak: FloatArray,
    path: FloatArray,
    actual: FloatArray,
    q: float,
) -> Metrics:
    """Metrics of peak forecasts against actual peaks (and central paths against actual paths)."""
    under = actual_peak > predicted_peak
    short = actual_peak - predicted_peak
    return Metrics(
        model=name,
        pinball_peak=calibration.pinball(actual_peak, predicted_peak, q),
        coverage=float(np.mean(~under)),
        under_rate=float(np.mean(under)),
        mean_shortfall=float(np.mean(short[under])) if under.any() else 0.0,
        mean_excess=float(np.mean(np.maximum(-short, 0.0))),
        path_mae=float(np.nanmean(np.abs(path - actual))),
        origins=int(predicted_peak.size),
    )


def backtest(
    timestamps: FloatArray,
    values: FloatArray,
    *,
    step_s: float,
    horizon_steps: int,
    quantile: float = 0.95,
    model: str = "auto",
    origin_stride_steps: int = 1,
    train_fraction: float = 0.5,
    refit_every_s: float = models.DAY_S,
    max_origins: int | None = None,
    global_model: object | None = None,
    max_refits: int = MAX_REFITS,
    recalibrate_every_s: float = models.DAY_S,
) -> BacktestReport:
    """Rolling-origin evaluation over the part of the series after `train_fraction` of it.

    Args:
        origin_stride_steps: steps between forecast origins.
        max_origins: if set, origins are thinned evenly to at most this many (the report says how many).

    Raises:
        ValueError: bad input (as `Forecaster.fit`), or too little data after the training span.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie strictly between 0 and 1, got {quantile}")
    if horizon_steps < 1 or origin_stride_steps < 1:
        raise ValueError(
            f"horizon_steps and origin_stride_steps must be >= 1, got {horizon_steps}, {origin_stride_steps}"
        )
    ts, vs = series.check_arrays(timestamps, values)
    _, y = series.to_grid(ts, vs, step_s, origin_s=float(ts[0]))
    pos0 = round(float(ts[0]) / step_s)
    n = y.size
    start = max(int(n * train_fraction), forecaster.MIN_POINTS + 1)
    ends = np.arange(start, n - horizon_steps + 1, origin_stride_steps, dtype=np.int64)
    if max_origins is not None and ends.size > max_origins:
        ends = np.unique(np.linspace(ends[0], ends[-1], max_origins).round().astype(np.int64))
    actual = (
        y[ends[:, None] + np.arange(horizon_steps)[None, :]] if ends.size else np.empty((0, horizon_steps))
    )
    keep = ~np.all(np.isnan(actual), axis=1)
    ends, actual = ends[keep], actual[keep]
    if ends.size == 0:
        raise ValueError(
            f"too little data to backtest: {n} steps, training on the first {start}, horizon {horizon_steps}"
        )
    actual_peak = np.nanmax(actual, axis=1)
    span = int(ends[-1] - ends[0]) + 1
    block = max(1, round(refit_every_s / step_s), math.ceil(span / max(1, max_refits)))
    pred_peak = np.empty(ends.size)
    center = np.empty((ends.size, horizon_steps))
    chosen: Counter[str] = Counter()
    # Blocks: refit before each, then run the fitted models over the block's origins.
    b0 = 0
    while b0 < ends.size:
        first = int(ends[b0])
        b1 = int(np.searchsorted(ends, first + block))
        blk = ends[b0:b1]
        f = forecaster.Forecaster(model, step_s, global_model=global_model, horizon_steps=None)
        f.fit(ts[0] + np.arange(first) * step_s, y[:first])
        hf = f._horizon_fit(horizon_steps)
        chosen[hf.model] += 1
        if hf.calib is None:
            for i, e in enumerate(blk):
                g = forecaster._fallback(y[:e], horizon_steps, (quantile,), 0.0)
                center[b0 + i] = forecaster._fallback(y[:e], horizon_steps, (0.5,), 0.0)[0][0.5]
                pred_peak[b0 + i] = g[1][quantile]
        else:
            # The Forecaster trimmed its history; models index absolute positions, so shift the origins.
            offset = first - f.y_.size
            yy = y[offset:]

            # Production refits hourly; between (costly) refits the backtest at least recalibrates daily
            # with the block's models on the origins before each day, so the band is not days stale.
            calib = hf.calib
            cal_len = max(round(f.calibration_s / step_s), 3 * horizon_steps + calibration.MIN_ORIGINS)
            day = max(1, round(recalibrate_every_s / step_s))
            s0 = 0
            while s0 < blk.size:
                s1 = int(np.searchsorted(blk, int(blk[s0]) + day))
                e0 = int(blk[s0])
                if s0 > 0:
                    cal_ends = np.arange(
                        max(offset + 1, e0 - cal_len), e0 - horizon_steps + 1, dtype=np.int64
                    )
                    if cal_ends.size > f.max_origins:
                        idx = np.linspace(0, cal_ends.size - 1, f.max_origins).round().astype(np.int64)
                        cal_ends = cal_ends[idx]
                    acts = y[cal_ends[:, None] + np.arange(horizon_steps)[None, :]]
                    ok = ~np.all(np.isnan(acts), axis=1)
                    if ok.sum() >= calibration.MIN_ORIGINS:
                        calib = calibration.Calibration.fit(
                            _centers(hf.components, yy, cal_ends[ok] - offset, horizon_steps, f.pos0_),
                            acts[ok],
                        )
                c = _centers(hf.components, yy, blk[s0:s1] - offset, horizon_steps, f.pos0_)
                _, peaks = calib.quantiles_batch(c, (quantile,))
                center[b0 + s0 : b0 + s1] = c
                pred_peak[b0 + s0 : b0 + s1] = peaks[quantile]
                s0 = s1
        b0 = b1
    main = score(model, pred_peak, actual_peak, center, actual, quantile)
    base: list[Metrics] = []
    for m in models.baseline_models(step_s):
        if start < m.min_history_steps:
            continue
        m.fit(y[:start], pos0=pos0)
        path = m.predict(y, ends, horizon_steps, pos0=pos0)
        base.append(score(m.name, path.max(axis=1), actual_peak, path, actual, quantile))
    return BacktestReport(
        horizon_steps=horizon_steps,
        step_s=step_s,
        quantile=quantile,
        model=main,
        baselines=base,
        chosen=dict(chosen),
        origin_s=ts[0] + ends * step_s,
        predicted_peak=pred_peak,
        actual_peak=actual_peak,
    )


def _centers(
    comps: list[models.Model], y: FloatArray, ends: npt.NDArray[np.int64], horizon: int, pos0: int
) -> FloatArray:
    out: FloatArray = np.mean([m.predict(y, ends, horizon, pos0=pos0) for m in comps], axis=0)
    return out


def parse_duration_s(text: str) -> float:
    """`90`, `90s`, `10m`, `2h`, `1d` -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError as exc:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 10m, 2h, 1d)") from exc
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"duration must be positive, got {text!r}")
    return value
