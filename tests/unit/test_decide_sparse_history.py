"""Scale-down needs most of the stabilization window's samples present, not one fresh sample among gaps."""

from __future__ import annotations

import math

from tests.unit.test_decide import NOW, codes, make_history, make_signals, make_spec, make_state, run


def test_one_fresh_sample_among_gaps_does_not_justify_a_drain() -> None:
    """Regression: a window of NaNs ending in one low sample let scale-down drain pods."""
    values = [40.0] * 5 + [math.nan] * 14 + [10.0]
    sigs = make_signals({"w0": 10, "w1": 0, "w2": 0, "w3": 0})
    plan = run(make_spec(), NOW, make_history(values, forecast=10), sigs, make_state(4))
    assert not plan.drain
    assert "HistorySparse" in codes(plan)
    assert plan.desired_replicas == 4


def test_a_few_missing_scrapes_still_allow_scale_down() -> None:
    values = [40.0] * 9 + [10.0, math.nan, 10.0, 10.0, math.nan, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    sigs = make_signals({"w0": 10, "w1": 0, "w2": 0, "w3": 0})
    plan = run(make_spec(), NOW, make_history(values, forecast=10), sigs, make_state(4))
    assert len(plan.drain) == 1 and "HistorySparse" not in codes(plan)
