"""Calibration on simulated data with a known distribution, and property tests of the outputs."""

from __future__ import annotations

import itertools
from statistics import NormalDist

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecast import Forecaster, calibration

STEP = 60.0


def test_peak_quantile_coverage_matches_on_iid_normal_demand() -> None:
    """Demand ~ N(100, 10) iid: P(max of H steps <= x) = Phi((x - 100) / 10) ** H exactly.

    Averaged over many seeded draws, the true coverage of the forecast q-quantile of the peak must be q.
    """
    horizon, q, draws = 10, 0.9, 30
    phi = NormalDist(100.0, 10.0).cdf
    peak_cov, step_cov = [], []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        y = rng.normal(100.0, 10.0, 1500)
        r = Forecaster("naive", STEP).fit(np.arange(y.size) * STEP, y).forecast(horizon, quantiles=(q,))
        peak_cov.append(phi(r.peak[q]) ** horizon)
        step_cov.append(np.mean([phi(v) for v in r.paths[q]]))
    assert abs(np.mean(peak_cov) - q) < 0.03
    assert abs(np.mean(step_cov) - q) < 0.03


def test_auto_coverage_on_poisson_seasonal_demand_over_new_data() -> None:
    """A daily-cycle Poisson series: forecast at many later origins, count how often the peak stays under."""
    rng = np.random.default_rng(7)
    step, day = 300.0, 288  # 5-minute steps keep the refits (gbm included) cheap
    horizon, q, stride = 3, 0.9, 2
    t = 1_700_006_400.0 + np.arange(6 * day) * step
    mean = 40 * (1.3 + np.sin(2 * np.pi * np.arange(t.size) / day))
    y = rng.poisson(mean).astype(float)
    f = Forecaster(step_s=step, refit_every_s=6 * 3600).fit(t[: 4 * day], y[: 4 * day])
    hits = []
    for k in range(4 * day, 6 * day - horizon, stride):
        if k > 4 * day:
            f.update(t[k - stride : k], y[k - stride : k])
        r = f.forecast(horizon, quantiles=(q,))
        hits.append(y[k : k + horizon].max() <= r.peak[q])
    assert len(hits) > 250
    assert 0.85 <= np.mean(hits) <= 0.95, np.mean(hits)


def test_conformal_quantile_of_scores_is_the_finite_sample_level() -> None:
    centers = np.zeros((19, 1))
    actuals = np.arange(1.0, 20.0)[:, None]
    cal = calibration.Calibration.fit(centers, actuals, power=0.0)
    assert cal.peak_offset(0.5) == 10.0  # ceil(20 * 0.5) = 10th smallest
    assert cal.peak_offset(0.9) == 18.0
    assert cal.peak_offset(0.99) > 19.0  # beyond the data: widened, never the max itself


series_values = st.lists(
    st.one_of(st.floats(0.0, 1e4, allow_nan=False), st.just(float("nan"))), min_size=3, max_size=400
).filter(lambda v: sum(x == x for x in v) >= 3)
quantile_sets = st.lists(st.floats(0.01, 0.99), min_size=1, max_size=5, unique=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=series_values, quantiles=quantile_sets, horizon=st.integers(1, 40))
def test_outputs_are_finite_nonnegative_and_monotone_in_the_quantile(
    values: list[float], quantiles: list[float], horizon: int
) -> None:
    y = np.array(values)
    f = Forecaster(step_s=STEP).fit(np.arange(y.size) * STEP, y)
    r = f.forecast(horizon, quantiles=quantiles)
    qs = sorted(quantiles)
    for q in qs:
        assert r.paths[q].shape == (horizon,)
        assert np.all(np.isfinite(r.paths[q])) and np.all(r.paths[q] >= 0)
        assert np.isfinite(r.peak[q]) and r.peak[q] >= 0
        assert r.peak[q] >= r.paths[q].max() - 1e-9
    for lo, hi in itertools.pairwise(qs):
        assert r.peak[lo] <= r.peak[hi] + 1e-9
        assert np.all(r.paths[lo] <= r.paths[hi] + 1e-9)
