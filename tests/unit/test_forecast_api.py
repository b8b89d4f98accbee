"""The Forecaster contract: input validation, predict-before-fit, output shape and invariants, updates."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from forecast import Forecaster, ForecastResult, NotFittedError

STEP = 60.0
DAY = 1440


def daily(days: int, *, seed: int = 0, level: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(days * DAY) * STEP + 1_700_006_400.0  # a UTC midnight
    phase = (t % 86400) / 86400
    mean = level * (1.2 + np.sin(2 * np.pi * phase))
    return t, rng.poisson(mean).astype(float)


def test_constructor_only_stores_arguments() -> None:
    f = Forecaster(model="nonsense", step_s=-1)
    assert f.model == "nonsense" and f.step_s == -1
    assert not hasattr(f, "model_name_")


def test_forecast_before_fit_raises_not_fitted() -> None:
    with pytest.raises(NotFittedError, match="not fitted"):
        Forecaster().forecast(10)
    with pytest.raises(NotFittedError):
        Forecaster().update([0.0], [1.0])


@pytest.mark.parametrize(
    ("ts", "vs", "message"),
    [
        (np.zeros((2, 3)), np.zeros((2, 3)), "1-D"),
        (np.arange(5) * STEP, np.ones(4), "differ in length"),
        (np.array([0.0, 60.0, 60.0, 120.0]), np.ones(4), "duplicate"),
        (np.array([0.0, 120.0, 60.0, 180.0]), np.ones(4), "non-monotonic"),
        (np.arange(5) * STEP, np.full(5, np.nan), "all values are NaN"),
        (np.arange(5) * STEP, np.array([1.0, np.nan, np.nan, np.nan, 2.0]), "too short"),
        (np.arange(5) * STEP, np.array([1.0, -2.0, 1.0, 1.0, 1.0]), "negative"),
        (np.arange(5) * STEP, np.array([1.0, np.inf, 1.0, 1.0, 1.0]), "infinite"),
        (np.array([0.0, 60.0, 150.0, 180.0]), np.ones(4), "regular step"),
        (np.array([], dtype=float), np.array([], dtype=float), "empty"),
    ],
)
def test_unusable_input_raises_value_error_naming_the_problem(
    ts: np.ndarray, vs: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Forecaster(step_s=STEP).fit(ts, vs)


def test_bad_parameters_raise_value_error() -> None:
    t, v = daily(1)
    with pytest.raises(ValueError, match="model must be one of"):
        Forecaster(model="prophet").fit(t, v)
    with pytest.raises(ValueError, match="step_s"):
        Forecaster(step_s=0).fit(t, v)
    f = Forecaster(step_s=STEP).fit(t, v)
    with pytest.raises(ValueError, match="horizon_steps"):
        f.forecast(0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        f.forecast(5, quantiles=(0.5, 1.0))


def test_forecast_has_paths_and_peaks_for_each_quantile() -> None:
    t, v = daily(3)
    f = Forecaster(step_s=STEP).fit(t, v)
    r = f.forecast(15, quantiles=(0.5, 0.9, 0.99))
    assert isinstance(r, ForecastResult)
    assert set(r.paths) == set(r.peak) == {0.5, 0.9, 0.99}
    for q in r.paths:
        assert r.paths[q].shape == (15,)
        assert np.all(np.isfinite(r.paths[q])) and np.all(r.paths[q] >= 0)
        assert r.peak[q] >= r.paths[q].max()
    assert r.peak[0.5] <= r.peak[0.9] <= r.peak[0.99]
    assert np.all(r.paths[0.5] <= r.paths[0.9])
    assert r.origin_s == t[-1]
    assert f.model_name_ == r.model and r.model != ""


def test_short_history_falls_back_to_recent_max_with_a_wide_band() -> None:
    t = np.arange(6) * STEP
    v = np.array([3.0, 5.0, 4.0, 9.0, 6.0, 5.0])
    f = Forecaster(step_s=STEP).fit(t, v)
    r = f.forecast(10, quantiles=(0.5, 0.95))
    assert f.model_name_ == "recent_max_fallback"
    assert r.peak[0.5] == pytest.approx(9.0)
    assert r.peak[0.95] > 9.0 * 1.5


def test_update_folds_in_new_points_and_moves_the_origin() -> None:
    t, v = daily(3)
    f = Forecaster(step_s=STEP).fit(t[:-30], v[:-30])
    before = f.forecast(10).origin_s
    f.update(t[-30:], v[-30:])
    r = f.forecast(10)
    assert r.origin_s == t[-1] and r.origin_s == before + 30 * STEP
    g = Forecaster(step_s=STEP).fit(t, v)
    # Same data, same calibration horizon: the live central path comes from the same recent samples.
    assert r.peak[0.95] == pytest.approx(g.forecast(10).peak[0.95], rel=0.25)


def test_update_rejects_off_grid_and_accepts_overlap_and_gaps() -> None:
    t, v = daily(2)
    f = Forecaster(step_s=STEP).fit(t, v)
    with pytest.raises(ValueError, match="off the grid"):
        f.update([t[-1] + 90.0], [1.0])
    f.update(t[-5:], v[-5:] + 1)  # overlap: overwrites
    f.update([t[-1] + 10 * STEP], [7.0])  # a gap of NaN, then a sample
    r = f.forecast(5)
    assert r.origin_s == t[-1] + 10 * STEP
    assert np.all(np.isfinite(r.paths[0.95]))


def test_gaps_and_nan_in_history_still_give_finite_forecasts() -> None:
    t, v = daily(4)
    v[1000:1400] = np.nan
    keep = np.ones(t.size, bool)
    keep[3000:3500] = False  # a real gap in the timestamps
    f = Forecaster(step_s=STEP).fit(t[keep], v[keep])
    r = f.forecast(30, quantiles=(0.1, 0.5, 0.95))
    for q in r.paths:
        assert np.all(np.isfinite(r.paths[q])) and np.all(r.paths[q] >= 0)
        assert np.isfinite(r.peak[q])


def test_a_due_refit_is_spread_over_the_next_forecasts_and_ends_as_an_immediate_one() -> None:
    """Regression: the hourly refit recalibrated inside one `forecast` call (p99 33 ms, max 338 ms).

    Now the served fit keeps answering while the recalibration runs a slice per call; once done, the
    forecast is exactly the one a recalibration at once on the same history gives.
    """
    t, v = daily(4)
    f = Forecaster("profile_day", STEP, refit_every_s=3600.0).fit(t[:-60], v[:-60])
    f.forecast(10)
    old = f.horizons_[10]
    f.update(t[-60:], v[-60:])
    assert 10 in f.pending_
    first = f.forecast(10)
    assert f.horizons_[10] is old and first.origin_s == t[-1]
    calls = 1
    while 10 in f.pending_:
        f.forecast(10)
        calls += 1
    assert 1 < calls < 60 and f.horizons_[10] is not old
    now = Forecaster("profile_day", STEP).fit(t, v).forecast(10, quantiles=(0.5, 0.95))
    done = f.forecast(10, quantiles=(0.5, 0.95))
    assert done.peak == now.peak
    np.testing.assert_array_equal(done.paths[0.95], now.paths[0.95])


def test_a_refit_due_while_one_runs_finishes_it_first_and_pickling_finishes_it_too() -> None:
    t, v = daily(4)
    f = Forecaster(step_s=STEP, refit_every_s=3600.0).fit(t[:-120], v[:-120])
    f.forecast(10)
    f.update(t[-120:-60], v[-120:-60])
    f.forecast(10)  # one slice only
    f.update(t[-60:], v[-60:])  # the next refit: the first recalibration completes, a new one starts
    assert set(f.pending_) == {10}
    g = pickle.loads(pickle.dumps(f))
    assert g.pending_ == {} and 10 in g.horizons_
    r = g.forecast(10)
    assert r.origin_s == t[-1] and np.isfinite(r.peak[0.95])
