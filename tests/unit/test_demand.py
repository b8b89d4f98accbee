"""`controller.demand` helpers without sockets: the signals-built history and replica addresses."""

from __future__ import annotations

import math

import numpy as np

from controller.demand import balancers, history

T0 = 1_700_000_040.0  # a whole minute


def test_signals_history_keeps_the_max_per_step_and_marks_missing_steps() -> None:
    h = history.SignalsHistory(step_s=60.0, history_s=600.0)
    assert h.history() is None
    h.add(T0 + 1, 5)
    h.add(T0 + 16, 9)
    h.add(T0 + 31, 7)
    h.add(T0 + 181, 3)  # two steps without a reading
    got = h.history()
    assert got is not None
    np.testing.assert_array_equal(got.timestamps, T0 + 60 * np.arange(4))
    assert (
        got.values[0] == 9 and math.isnan(got.values[1]) and math.isnan(got.values[2]) and got.values[3] == 3
    )
    assert got.fetched_s == T0 + 181 and got.step_s == 60.0


def test_signals_history_keeps_only_its_window_and_restarts_after_a_long_gap() -> None:
    h = history.SignalsHistory(step_s=60.0, history_s=300.0)
    for k in range(12):
        h.add(T0 + 60 * k, float(k))
    got = h.history()
    assert got is not None and got.values.tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    h.add(T0 + 60 * 30, 1.0)
    got = h.history()
    assert got is not None and got.values.tolist() == [1.0]
    h.add(T0, 99.0)  # a clock step back is dropped, the order kept
    again = h.history()
    assert again is not None and again.values.tolist() == [1.0]


def test_replica_addresses_bracket_ipv6() -> None:
    assert balancers.replica_addresses(["10.0.0.5", "fd00::1", "balancer-0.balancer.ns.svc"], 8081) == [
        "10.0.0.5:8081",
        "[fd00::1]:8081",
        "balancer-0.balancer.ns.svc:8081",
    ]
