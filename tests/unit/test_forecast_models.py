"""Each model on scripted series whose right answer is known: seasonality, trend, level shift, spikes, gaps."""

from __future__ import annotations

import numpy as np
import pytest

from forecast import Forecaster, errors, models

STEP = 60.0
DAY = 1440
T0 = 1_700_006_400.0  # a UTC midnight, so grid phase 0 is midnight
POS0 = round(T0 / STEP)


def seasonal(days: int, *, level: float = 100.0) -> np.ndarray:
    phase = np.arange(days * DAY) / DAY
    return level * (1.5 + np.sin(2 * np.pi * phase))


def ends(*e: int) -> np.ndarray:
    return np.array(e, dtype=np.int64)


def test_seasonal_naive_repeats_yesterday_and_reaches_back_over_nan() -> None:
    y = seasonal(3)
    y[2 * DAY + 10] = np.nan  # yesterday's sample for step 10 of today's forecast from 3*DAY... (see below)
    m = models.SeasonalNaive(DAY, "snaive_day")
    n = 3 * DAY
    path = m.predict(y, ends(n), 30, pos0=POS0)[0]
    assert path == pytest.approx(seasonal(4)[n : n + 30])
    y2 = y.copy()
    y2[n - DAY + 5] = np.nan
    path2 = m.predict(y2, ends(n), 30, pos0=POS0)[0]
    assert path2[5] == pytest.approx(y2[n - 2 * DAY + 5])


def test_profile_recovers_pure_seasonality() -> None:
    y = seasonal(6)
    m = models.SeasonalProfile(DAY, "profile_day", step_s=STEP).fit(y, pos0=POS0)
    n = y.size
    truth = seasonal(7)[n : n + 120]
    path = m.predict(y, ends(n), 120, pos0=POS0)[0]
    assert np.max(np.abs(path - truth)) < 0.02 * truth.max()


def test_profile_follows_a_level_shift_within_the_level_window() -> None:
    y = seasonal(6)
    n = y.size
    y[n - 60 :] *= 2.0  # launch: demand doubles in the last hour
    m = models.SeasonalProfile(DAY, "profile_day", step_s=STEP).fit(y, pos0=POS0)
    path = m.predict(y, ends(n), 30, pos0=POS0)[0]
    truth = 2.0 * seasonal(7)[n : n + 30]
    assert np.max(np.abs(path - truth)) < 0.05 * truth.max()
    # Seasonal naive is blind to it: it repeats yesterday's (old) level.
    naive = models.SeasonalNaive(DAY, "snaive_day").predict(y, ends(n), 30, pos0=POS0)[0]
    assert naive.max() < 0.6 * truth.max()


def test_spikes_on_past_days_do_not_poison_the_profile() -> None:
    y = seasonal(6)
    for d in (2, 4):  # two spikes of 20x at the very phase the forecast will cover
        y[d * DAY + 100 : d * DAY + 105] *= 20
    m = models.SeasonalProfile(DAY, "profile_day", step_s=STEP).fit(y[: 5 * DAY], pos0=POS0)
    path = m.predict(y, ends(5 * DAY + 90), 20, pos0=POS0)[0]
    truth = seasonal(7)[5 * DAY + 90 : 5 * DAY + 110]
    assert np.max(np.abs(path - truth)) < 0.05 * truth.max()


def test_recent_max_and_naive() -> None:
    y = np.array([1.0, 7.0, 3.0, np.nan, 2.0, np.nan])
    assert models.RecentMax(window=3).predict(y, ends(6), 4, pos0=0)[0].tolist() == [2.0] * 4
    assert models.RecentMax(window=5).predict(y, ends(6), 2, pos0=0)[0].tolist() == [7.0] * 2
    assert models.Naive().predict(y, ends(6, 3), 2, pos0=0).tolist() == [[2.0, 2.0], [3.0, 3.0]]
    # Many origins take the vectorised path and must agree with the per-origin one.
    many = np.arange(1, 7, dtype=np.int64)
    batch = models.RecentMax(window=2).predict(y, np.concatenate([many, many]), 1, pos0=0)[:6, 0]
    one = [models.RecentMax(window=2).predict(y, ends(int(e)), 1, pos0=0)[0, 0] for e in many]
    assert batch.tolist() == one


def test_auto_forecasts_a_linear_trend_peak_from_its_own_errors() -> None:
    """No model extrapolates trends; calibration on the recent errors adds exactly the missing climb."""
    n, slope, horizon = 3000, 0.05, 20
    t = T0 + np.arange(n) * STEP
    y = 10.0 + slope * np.arange(n)
    r = Forecaster(step_s=STEP).fit(t, y).forecast(horizon, quantiles=(0.5, 0.95))
    truth = 10.0 + slope * (n - 1 + horizon)
    assert r.peak[0.5] == pytest.approx(truth, rel=0.01)
    assert r.paths[0.5] == pytest.approx(10.0 + slope * np.arange(n, n + horizon), rel=0.01)


def test_auto_on_pure_seasonality_gets_the_peak_and_a_tight_band() -> None:
    y = seasonal(4)
    t = T0 + np.arange(y.size) * STEP
    f = Forecaster(step_s=STEP).fit(t[: -DAY // 2], y[: -DAY // 2])  # origin at noon, before the rise
    r = f.forecast(120, quantiles=(0.5, 0.95))
    n = y.size - DAY // 2
    truth = seasonal(5)[n : n + 120].max()
    assert r.peak[0.5] == pytest.approx(truth, rel=0.02)
    assert r.peak[0.95] == pytest.approx(truth, rel=0.05)
    assert f.model_name_ != "recent_max_fallback"


def test_auto_on_series_with_outage_gap_stays_finite_and_recovers_the_level() -> None:
    y = seasonal(5)
    t = T0 + np.arange(y.size) * STEP
    y[3 * DAY : 3 * DAY + 600] = 0.0  # an outage: real zeros
    y[4 * DAY : 4 * DAY + 200] = np.nan  # then missing data
    f = Forecaster(step_s=STEP).fit(t, y)
    r = f.forecast(30, quantiles=(0.5,))
    truth = seasonal(6)[y.size : y.size + 30].max()
    assert np.all(np.isfinite(r.paths[0.5]))
    assert r.peak[0.5] == pytest.approx(truth, rel=0.1)


@pytest.mark.parametrize("name", ["naive", "recent_max", "snaive_day", "profile_day"])
def test_each_forced_model_is_the_one_used(name: str) -> None:
    y = seasonal(3)
    t = T0 + np.arange(y.size) * STEP
    f = Forecaster(name, STEP).fit(t, y)
    r = f.forecast(10)
    assert f.model_name_ == name == r.model


def hourly(days: int, *, level: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = np.arange(days * 24)
    return level * (1.5 + np.sin(2 * np.pi * h / 24)) + rng.normal(0, 0.02 * level, h.size)


def test_per_series_gbm_learns_the_daily_shape() -> None:
    y = hourly(40, level=50.0, seed=3)
    f = Forecaster("gbm", 3600.0).fit(np.arange(y.size - 24) * 3600.0, y[:-24])
    r = f.forecast(24, quantiles=(0.5, 0.9))
    assert f.model_name_ == "gbm"
    truth = 50.0 * (1.5 + np.sin(2 * np.pi * np.arange(y.size - 24, y.size) / 24))
    assert np.max(np.abs(r.paths[0.5] - truth)) < 0.15 * truth.max()
    assert r.peak[0.9] >= truth.max() * 0.95


def test_global_gbm_fitted_on_many_series_forecasts_an_unseen_one() -> None:
    """Trained across series of different levels (scaled features), it serves a new series' level."""
    from forecast import gbm

    train = [hourly(30, level=lv, seed=i) for i, lv in enumerate((5.0, 20.0, 80.0, 300.0))]
    g = gbm.GlobalGBM(3600.0, (24,), horizon=24).fit(train, rows_per_series=300)
    y = hourly(20, level=1000.0, seed=99)
    f = Forecaster("gbm", 3600.0, global_model=g, season_steps=(24,)).fit(np.arange(y.size) * 3600.0, y)
    r = f.forecast(24, quantiles=(0.5,))
    truth = 1000.0 * (1.5 + np.sin(2 * np.pi * np.arange(y.size, y.size + 24) / 24))
    assert f.model_name_ == "gbm"
    assert np.max(np.abs(r.paths[0.5] - truth)) < 0.15 * truth.max()


@pytest.mark.parametrize("loss", ["quantile", "squared_error"])
def test_forest_predicts_what_scikit_learn_predicts_nan_included(loss: str) -> None:
    """`gbm.Forest` walks scikit-learn's fitted trees itself for the live forecast's few rows; it must
    agree with `predict`, missing values (routed by each split's learned side) included."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    from forecast import gbm

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 6))
    x[rng.random(x.shape) < 0.1] = np.nan
    y = np.nan_to_num(x[:, 0]) * 2 + np.sin(np.nan_to_num(x[:, 1])) + rng.normal(scale=0.1, size=3000)
    kw = {"quantile": 0.5} if loss == "quantile" else {}
    reg = HistGradientBoostingRegressor(loss=loss, max_iter=40, max_leaf_nodes=15, random_state=0, **kw)
    reg.fit(x, y)
    test = rng.normal(size=(200, 6))
    test[rng.random(test.shape) < 0.2] = np.nan
    np.testing.assert_allclose(gbm.Forest(reg).predict(test), reg.predict(test), rtol=1e-9, atol=1e-9)


def test_median_of_is_the_per_step_median_and_skips_components_without_history() -> None:
    y = seasonal(3) + np.linspace(0, 30, 3 * DAY)
    parts: list[models.Model] = [models.SeasonalNaive(DAY, "snaive_day"), models.Naive(), models.RecentMax()]
    week = models.SeasonalNaive(7 * DAY, "snaive_week")  # needs a week: left out on three days
    m = models.MedianOf([*parts, week], "median").fit(y, pos0=POS0)
    e = ends(2 * DAY, 3 * DAY)
    want = np.median([p.fit(y, pos0=POS0).predict(y, e, 30, pos0=POS0) for p in parts], axis=0)
    np.testing.assert_array_equal(m.predict(y, e, 30, pos0=POS0), want)
    with pytest.raises(errors.InsufficientHistory):
        models.MedianOf([week], "median").fit(y, pos0=POS0)


def test_forced_median_model_and_the_uncalibrated_center() -> None:
    """`center` is the model's own path; `paths[0.5]` adds the calibrated median error to it."""
    y = hourly(20, level=50.0, seed=5)
    t = np.arange(y.size) * 3600.0
    r = Forecaster("median", 3600.0, season_steps=(24, 168)).fit(t, y).forecast(24, quantiles=(0.5,))
    assert r.model == "median" and r.center is not None and np.all(np.isfinite(r.center))
    s = Forecaster("snaive_day", 3600.0).fit(t, y).forecast(24, quantiles=(0.5,))
    assert s.center is not None
    np.testing.assert_array_equal(s.center, y[-24:])
    assert not np.array_equal(s.paths[0.5], s.center)


def test_global_gbm_reads_more_past_periods_than_the_per_series_one() -> None:
    from forecast import gbm

    train = [hourly(30, level=lv, seed=i) for i, lv in enumerate((5.0, 20.0, 80.0))]
    deep = gbm.GlobalGBM(3600.0, (24,), horizon=24).fit(train, rows_per_series=300)
    shallow = gbm.GlobalGBM(3600.0, (24,), horizon=24, periods_back=2).fit(train, rows_per_series=300)
    # Seven same-hour values and their median, against two: six more feature columns.
    assert deep.regressor_.n_features_in_ - shallow.regressor_.n_features_in_ == 6  # type: ignore[attr-defined]
