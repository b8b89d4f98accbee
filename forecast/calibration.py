"""Conformal calibration: quantiles of the peak (and of each step) from a model's own recent errors.

A model gives a central path; the controller needs the q-quantile of the PEAK over the horizon, with the
stated coverage on new data. Split conformal prediction does that without assuming a distribution: run the
model at many past origins, score each by how far the actual peak landed above or below the predicted
peak, and add the ceil((n+1)q)-th smallest score to the next prediction. Scores are scaled by
`max(predicted, floor) ** power`: power 0 is additive error (flat noise), 1 is relative error (noise
proportional to the level), 0.5 sits between (Poisson-like counts). The power is chosen on a time split of
the origins, so the choice is itself out of sample.

Per-step quantile paths are calibrated the same way, step by step. The peak quantile is then raised to at
least the largest per-step quantile, since the q-quantile of a maximum is never below any step's q-quantile.

What it does not do: adapt within a calibration window (it is recomputed as the forecaster refits), or
promise coverage when the future is unlike the recent past (a new level shift shows up in the next window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

POWERS = (0.0, 0.5, 1.0)
"""Score scalings tried: additive, square-root (counts), relative."""

SELECTION_QUANTILES = (0.5, 0.9, 0.95)
"""Quantiles whose peak pinball loss ranks models and score scalings: the median and the upper band."""

SELECTION_SPLIT = 0.6
"""Fraction of origins (the older ones) that calibrate when ranking; the newer rest is scored."""

MIN_ORIGINS = 12
"""Fewer calibration origins than this cannot place a 95% quantile; the forecaster falls back instead."""


def pinball(actual: FloatArray, predicted: FloatArray | float, q: float) -> float:
    """Mean pinball (quantile) loss of `predicted` as the q-quantile of `actual`."""
    diff = actual - predicted
    return float(np.mean(np.maximum(q * diff, (q - 1) * diff)))


def conformal_level(n: int, q: float) -> float:
    """The finite-sample conformal level ceil((n+1)q)/n, capped at 1."""
    return min(1.0, math.ceil((n + 1) * q) / n)


@dataclass
class Calibration:
    """Conformity scores of one model at one horizon, and how to turn a central path into quantiles."""

    power: float
    floor: float
    peak_scores: FloatArray
    """Sorted scaled peak errors (actual peak minus predicted peak, divided by the scale)."""
    step_scores: FloatArray
    """Scaled per-step errors, shape `(origins, horizon)`, NaN where the actual was missing."""
    _paths: dict[float, FloatArray] = field(default_factory=dict, repr=False)
    _peaks: dict[float, float] = field(default_factory=dict, repr=False)

    @classmethod
    def fit(cls, centers: FloatArray, actuals: FloatArray, *, power: float | None = None) -> Calibration:
        """Scores from central paths and actuals at the same origins (rows without any actual dropped)."""
        keep = ~np.all(np.isnan(actuals), axis=1)
        centers, actuals = centers[keep], actuals[keep]
        if centers.shape[0] < 1:
            raise ValueError("no calibration origin has an actual value")
        if power is None:
            power = min(POWERS, key=lambda p: split_loss(centers, actuals, power=p))
        floor = _floor(centers)
        peak_c, peak_a = centers.max(axis=1), np.nanmax(actuals, axis=1)
        peak_scores = np.sort((peak_a - peak_c) / _scale(peak_c, floor, power))
        step_scores = (actuals - centers) / _scale(centers, floor, power)
        return cls(power, floor, peak_scores, step_scores)

    @property
    def n(self) -> int:
        return int(self.peak_scores.size)

    def peak_offset(self, q: float) -> float:
        """The conformal q-quantile of the scaled peak score."""
        if q not in self._peaks:
            self._peaks[q] = _quantile_sorted(self.peak_scores, q)
        return self._peaks[q]

    def path_offsets(self, q: float) -> FloatArray:
        """Per-step conformal q-quantiles of the scaled step scores."""
        if q not in self._paths:
            s = self.step_scores
            counts = np.sum(~np.isnan(s), axis=0)
            out = np.full(s.shape[1], self.peak_offset(q))
            ok = counts > 0
            if ok.any():
                srt = np.sort(s[:, ok], axis=0)  # NaN sort last
                n_ok = counts[ok]
                k = np.minimum(np.ceil((n_ok + 1) * q).astype(np.int64), n_ok) - 1
                out[ok] = srt[k, np.arange(k.size)]
            self._paths[q] = out
        return self._paths[q]

    def quantiles(
        self, center: FloatArray, quantiles: Sequence[float]
    ) -> tuple[dict[float, FloatArray], dict[float, float]]:
        """Per-step paths and peak values for each quantile: finite, >= 0, monotone in q."""
        paths, peaks = self.quantiles_batch(center[None, :], quantiles)
        return {q: p[0] for q, p in paths.items()}, {q: float(v[0]) for q, v in peaks.items()}

    def quantiles_batch(
        self, centers: FloatArray, quantiles: Sequence[float]
    ) -> tuple[dict[float, FloatArray], dict[float, FloatArray]]:
        """`quantiles` for many central paths at once (rows), as the backtest needs."""
        paths: dict[float, FloatArray] = {}
        peaks: dict[float, FloatArray] = {}
        peak_c = centers.max(axis=1)
        scale_path = _scale(centers, self.floor, self.power)
        scale_peak = _scale(peak_c, self.floor, self.power)
        prev_path = np.zeros_like(centers)
        prev_peak = np.zeros_like(peak_c)
        for q in sorted(quantiles):
            path = np.nan_to_num(centers + scale_path * self.path_offsets(q)[None, :], nan=0.0, posinf=0.0)
            path = np.maximum(path, prev_path)
            peak = np.nan_to_num(peak_c + scale_peak * self.peak_offset(q), nan=0.0, posinf=0.0)
            peak = np.maximum(np.maximum(peak, path.max(axis=1)), prev_peak)
            paths[q], peaks[q] = path, peak
            prev_path, prev_peak = path, peak
        return paths, peaks


def split_loss(
    centers: FloatArray,
    actuals: FloatArray,
    *,
    power: float,
    quantiles: Sequence[float] = SELECTION_QUANTILES,
) -> float:
    """Out-of-sample peak pinball loss: calibrate on the older origins, score on the newer ones."""
    n = centers.shape[0]
    cut = max(1, min(n - 1, round(n * SELECTION_SPLIT)))
    floor = _floor(centers[:cut])
    peak_c, peak_a = centers.max(axis=1), np.nanmax(actuals, axis=1)
    scale = _scale(peak_c, floor, power)
    scores = np.sort((peak_a[:cut] - peak_c[:cut]) / scale[:cut])
    total = 0.0
    for q in quantiles:
        pred = peak_c[cut:] + scale[cut:] * _quantile_sorted(scores, q)
        total += pinball(peak_a[cut:], np.maximum(pred, 0.0), q)
    return total / len(quantiles)


def _floor(centers: FloatArray) -> float:
    med = float(np.median(centers.max(axis=1))) if centers.size else 0.0
    return max(1e-6, 0.05 * med, 1.0 if med >= 1.0 else 0.0)


def _scale(x: FloatArray, floor: float, power: float) -> FloatArray:
    return np.maximum(x, floor) ** power


def _quantile_sorted(scores: FloatArray, q: float) -> float:
    """Conformal quantile of sorted scores; above the last score, the maximum widened by its spread."""
    n = scores.size
    k = math.ceil((n + 1) * q)
    if k <= n:
        return float(scores[k - 1])
    spread = float(scores[-1] - np.median(scores))
    return float(scores[-1] + max(spread, 0.0) * (k - n) / max(n, 1))
