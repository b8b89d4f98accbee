"""`controller.forecasting.PolicyForecast`: fit once, update with only new samples, cache unchanged calls,
recreate on settings change, and say why when there is no forecast."""

from __future__ import annotations

import numpy as np

from controller import decide, forecasting, policy

T0 = 1_700_000_000.0 - 1_700_000_000.0 % 60
STEP = 60.0


def settings(**kw: object) -> policy.Forecast:
    base: dict[str, object] = {"stepSeconds": STEP, "historySeconds": 86400, "model": "recentMax"}
    base.update(kw)
    return policy.Forecast.model_validate(base)


def series(n: int, level: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    return T0 + STEP * np.arange(n, dtype=np.float64), np.full(n, level)


def test_too_few_samples_give_no_forecast_and_say_why() -> None:
    pf = forecasting.PolicyForecast(settings())
    ts, vs = series(2)
    assert pf.peak(ts, vs, now=ts[-1], horizon_s=480) is None
    assert pf.error_ is not None and "only 2 demand samples" in pf.error_
    ts, vs = series(0)
    assert pf.peak(ts, vs, now=T0, horizon_s=480) is None and "no demand history" in (pf.error_ or "")


def test_first_call_fits_and_returns_the_peak_over_the_horizon() -> None:
    pf = forecasting.PolicyForecast(settings(quantile=0.9))
    ts, vs = series(120)
    vs[-5] = 30.0
    peak = pf.peak(ts, vs, now=ts[-1] + 5, horizon_s=450)
    assert isinstance(peak, decide.PeakForecast)
    assert peak.quantile == 0.9 and peak.horizon_s == 480 and len(peak.path) == 8
    assert peak.value >= 30.0 and peak.computed_s == ts[-1] + 5
    assert peak.model and pf.fits_ == 1 and pf.error_ is None


def test_unchanged_history_reuses_the_forecast() -> None:
    pf = forecasting.PolicyForecast(settings())
    ts, vs = series(120)
    first = pf.peak(ts, vs, now=ts[-1], horizon_s=480)
    fitted = pf.forecaster_
    assert fitted is not None
    size = fitted.y_.size
    again = pf.peak(ts, vs, now=ts[-1] + 15, horizon_s=480)
    assert first is not None and again is not None
    assert again.value == first.value and again.computed_s == ts[-1] + 15
    assert pf.forecaster_ is fitted and fitted.y_.size == size and pf.fits_ == 1


def test_new_samples_are_folded_in_without_refitting() -> None:
    pf = forecasting.PolicyForecast(settings())
    ts, vs = series(120)
    before = pf.peak(ts, vs, now=ts[-1], horizon_s=480)
    fitted = pf.forecaster_
    assert before is not None and fitted is not None
    ts2, vs2 = series(121)
    vs2[-1] = 55.0
    after = pf.peak(ts2[1:], vs2[1:], now=ts2[-1], horizon_s=480)  # the window slid by one step
    assert after is not None and after.value >= 55.0 > before.value
    assert pf.forecaster_ is fitted and pf.fits_ == 1
    assert fitted.y_.size == 121 and fitted.y_[-1] == 55.0


def test_a_late_correction_of_the_tail_is_taken() -> None:
    pf = forecasting.PolicyForecast(settings())
    ts, vs = series(120)
    pf.peak(ts, vs, now=ts[-1], horizon_s=480)
    corrected = vs.copy()
    corrected[-2] = 80.0  # Prometheus filled in a late scrape two steps back
    peak = pf.peak(ts, corrected, now=ts[-1] + 15, horizon_s=480)
    assert peak is not None and peak.value >= 80.0


def test_a_changed_horizon_is_forecast_again() -> None:
    pf = forecasting.PolicyForecast(settings())
    ts, vs = series(120)
    short = pf.peak(ts, vs, now=ts[-1], horizon_s=120)
    long = pf.peak(ts, vs, now=ts[-1], horizon_s=900)
    assert short is not None and long is not None
    assert len(short.path) == 2 and len(long.path) == 15


def test_negative_and_infinite_samples_are_treated_as_missing() -> None:
    pf = forecasting.PolicyForecast(settings())
    ts, vs = series(60)
    vs[10], vs[20] = -5.0, np.inf
    peak = pf.peak(ts, vs, now=ts[-1], horizon_s=480)
    assert peak is not None and np.isfinite(peak.value) and pf.error_ is None


def test_an_off_grid_update_fails_clearly_and_refits_next_time() -> None:
    pf = forecasting.PolicyForecast(settings())
    ts, vs = series(60)
    assert pf.peak(ts, vs, now=ts[-1], horizon_s=480) is not None
    bad = np.append(ts, ts[-1] + 7.0)
    assert pf.peak(bad, np.append(vs, 10.0), now=bad[-1], horizon_s=480) is None
    assert pf.error_ is not None and "forecast failed" in pf.error_ and "grid" in pf.error_
    assert pf.peak(ts, vs, now=ts[-1], horizon_s=480) is not None and pf.fits_ == 2


def test_long_histories_switch_to_the_long_refit_interval() -> None:
    """The simulator's week-long runs refit every 6 hours once a day of history is in (30 refits, not 168)."""
    pf = forecasting.PolicyForecast(settings(), refit_every_s=3600.0, refit_every_long_s=6 * 3600.0)
    ts, vs = series(3 * 1440)
    day = 1440
    assert pf.peak(ts[:60], vs[:60], now=ts[59], horizon_s=480) is not None
    assert pf.forecaster_ is not None and pf.forecaster_.refit_every_s == 3600.0
    pf.peak(ts[: day - 10], vs[: day - 10], now=ts[day - 11], horizon_s=480)
    assert pf.forecaster_.refit_every_s == 3600.0
    pf.peak(ts[: day + 10], vs[: day + 10], now=ts[day + 9], horizon_s=480)
    assert pf.forecaster_.refit_every_s == 6 * 3600.0


def test_policy_model_names_map_onto_the_forecast_package() -> None:
    from forecast import forecaster

    assert set(forecasting.MODEL_NAMES) == set(policy.Forecast.model_fields["model"].annotation.__args__)  # type: ignore[union-attr]
    assert set(forecasting.MODEL_NAMES.values()) <= set(forecaster.MODEL_NAMES)
