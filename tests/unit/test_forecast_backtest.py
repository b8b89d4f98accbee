"""The backtest API: metrics computed as defined, and the same forecasts the Forecaster itself makes."""

from __future__ import annotations

import numpy as np
import pytest

from forecast import Forecaster, backtest

STEP = 60.0
T0 = 1_700_006_400.0


def test_metrics_by_hand() -> None:
    pred = np.array([10.0, 10.0, 10.0, 10.0])
    actual = np.array([8.0, 12.0, 10.0, 15.0])
    m = backtest.score(
        "x", pred, actual, np.full((4, 2), 9.0), np.array([[9, 9], [9, 10], [8, 8], [9, 9.0]]), 0.9
    )
    assert m.coverage == 0.5 and m.under_rate == 0.5
    assert m.mean_shortfall == pytest.approx((2 + 5) / 2)
    assert m.mean_excess == pytest.approx(2 / 4)
    assert m.pinball_peak == pytest.approx((0.1 * 2 + 0.9 * 2 + 0 + 0.9 * 5) / 4)
    assert m.path_mae == pytest.approx(3 / 8)


def test_backtest_forecast_at_a_block_start_equals_the_forecaster() -> None:
    """No leak, no drift: at the first origin of a block the backtest's peak is fit-then-forecast's."""
    rng = np.random.default_rng(5)
    n = 4 * 1440
    t = T0 + np.arange(n) * STEP
    y = rng.poisson(30 * (1.3 + np.sin(2 * np.pi * np.arange(n) / 1440))).astype(float)
    r = backtest.backtest(
        t, y, step_s=STEP, horizon_steps=15, quantile=0.9, model="profile_day", train_fraction=0.75
    )
    first = round(float(r.origin_s[0] - T0) / STEP)
    f = Forecaster("profile_day", STEP).fit(t[:first], y[:first])
    assert r.predicted_peak[0] == pytest.approx(f.forecast(15, quantiles=(0.9,)).peak[0.9])
    assert r.actual_peak[0] == y[first : first + 15].max()
    names = [b.model for b in r.baselines]
    assert names == ["snaive_day", "recent_max"]
    assert r.model.origins == n - first - 15 + 1


def test_backtest_rejects_too_little_data_and_bad_quantiles() -> None:
    t = T0 + np.arange(10) * STEP
    with pytest.raises(ValueError, match="too little data"):
        backtest.backtest(t, np.ones(10), step_s=STEP, horizon_steps=8)
    with pytest.raises(ValueError, match="quantile"):
        backtest.backtest(t, np.ones(10), step_s=STEP, horizon_steps=2, quantile=1.0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("30s", 30.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert backtest.parse_duration_s(text) == seconds


def test_bad_durations() -> None:
    with pytest.raises(ValueError, match="duration"):
        backtest.parse_duration_s("soon")
    with pytest.raises(ValueError, match="positive"):
        backtest.parse_duration_s("-5m")
