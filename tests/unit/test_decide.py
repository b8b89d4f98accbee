"""`decide()` rule by rule, with time passed in: clamps, floor vs forecast, stabilization, rate limit, drains,
undrain, hotspots, missing data, annotations, horizon, provisioner. Scenarios over time: test_decide_scenarios."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import pytest

from contract import signals as sig
from controller import cluster, decide, policy
from tests.fakes import specs
from tests.fakes.cluster import FakeCluster

NOW = 1_700_000_000.0
STEP_S = 60.0
SPR = 10
"""Streams per replica in every test policy: 25 streams need 3 replicas."""


class Demand(NamedTuple):
    """A demand history and the forecast made from it: the two inputs `decide()` takes side by side."""

    history: decide.DemandHistory
    forecast: decide.PeakForecast | None


def run(
    spec: policy.ScalingPolicySpec,
    now: float,
    demand: Demand | None,
    signals: decide.SignalsSnapshot | None,
    state: cluster.ClusterState,
) -> decide.Plan:
    """`decide.decide` with the history and its forecast given as one test value."""
    return decide.decide(
        spec,
        now,
        history=None if demand is None else demand.history,
        forecast=None if demand is None else demand.forecast,
        signals=signals,
        state=state,
    )


def make_spec(**over: Any) -> policy.ScalingPolicySpec:
    """A valid policy with both demand sources; `over` replaces top-level wire sections."""
    sections: dict[str, Any] = {
        "demand": {
            "prometheus": {"query": "sum(x)"},
            "balancer": {"service": "balancer"},
            "staleAfterSeconds": 60,
        },
        "capacity": {"streamsPerReplica": SPR},
        "replicas": {"min": 1, "max": 20},
        "scaleDown": {"stabilizationWindowSeconds": 600, "maxPodsPerMinute": 1, "drainTimeoutSeconds": 300},
    }
    sections.update(over)
    return specs.spec(**sections)


def make_history(
    values: list[float] | np.ndarray,
    *,
    now: float = NOW,
    forecast: float | None = None,
    quantile: float = 0.95,
    horizon_s: float = 480.0,
    path: tuple[float, ...] = (),
    fetched_s: float | None = None,
    forecast_at: float | None = None,
) -> Demand:
    """History whose last sample is at `now`, one per `STEP_S`, plus a forecast made at `now` by default."""
    vals = np.asarray(values, dtype=np.float64)
    ts = now - STEP_S * np.arange(vals.size - 1, -1, -1, dtype=np.float64)
    fc = None
    if forecast is not None:
        fc = decide.PeakForecast(
            value=forecast,
            quantile=quantile,
            horizon_s=horizon_s,
            model="test",
            computed_s=now if forecast_at is None else forecast_at,
            path=path,
        )
    history = decide.DemandHistory(
        step_s=STEP_S, timestamps=ts, values=vals, fetched_s=now if fetched_s is None else fetched_s
    )
    return Demand(history, fc)


def flat(level: float, minutes: int = 20, *, forecast: float | None = None, now: float = NOW) -> Demand:
    return make_history([level] * minutes, now=now, forecast=level if forecast is None else forecast)


def make_signals(
    loads: dict[str, int | tuple[int, int]], *, time_s: float = NOW, admission_queue: int = 0, **backend: Any
) -> decide.SignalsSnapshot:
    """Signals with one backend per pod: `loads[pod]` = active streams, or (active, open sessions)."""
    backends = {}
    for i, (pod, load) in enumerate(loads.items()):
        active, sessions = load if isinstance(load, tuple) else (load, 0)
        extra = backend.get(pod, {})
        address = f"10.0.0.{i + 1}:8000"
        backends[address] = sig.BackendSignals(
            address=address, pod=pod, state="ready", active_streams=active, open_sessions=sessions, **extra
        )
    return decide.SignalsSnapshot(time_s=time_s, backends=backends, admission_queue=admission_queue)


def ready_pods(
    n: int, *, prefix: str = "w", annotations: dict[str, dict[str, str]] | None = None
) -> tuple[cluster.PodState, ...]:
    ann = annotations or {}
    return tuple(
        cluster.PodState(
            name=f"{prefix}{i}",
            phase="ready",
            created_s=NOW - 3600 + i,
            ready_s=NOW - 3000 + i,
            annotations=ann.get(f"{prefix}{i}", {}),
        )
        for i in range(n)
    )


def make_state(n: int, **kw: Any) -> cluster.ClusterState:
    pods = kw.pop("pods", None)
    return cluster.ClusterState(spec_replicas=n, pods=ready_pods(n) if pods is None else pods, **kw)


def codes(plan: decide.Plan) -> list[str]:
    return [r.code for r in plan.reasons]


def drained_at(t: float) -> dict[str, str]:
    return {cluster.DRAIN_ANNOTATION: f"{t:.3f}"}


# --- scale-up: floor, forecast, clamps ---------------------------------------------------------------------


def test_reactive_floor_sets_replicas_when_forecast_is_lower() -> None:
    plan = run(make_spec(), NOW, flat(25, forecast=12), make_signals({"w0": 25}), make_state(1))
    assert plan.desired_replicas == 3
    assert plan.observed_demand == 25
    assert codes(plan)[0] == "ReactiveFloor"
    assert "ForecastPeak" not in codes(plan)
    assert plan.demand_data_available


def test_forecast_raises_capacity_above_the_floor() -> None:
    plan = run(make_spec(), NOW, flat(25, forecast=61), make_signals({"w0": 25}), make_state(1))
    assert plan.desired_replicas == 7
    assert "ForecastPeak" in codes(plan)
    assert plan.forecast is not None and plan.forecast.value == 61


def test_admission_queue_counts_as_demand_but_backend_queue_does_not() -> None:
    """A stream the backend queues is already counted active by the balancer (from pick to last byte)."""
    signals = make_signals({"w0": 20}, admission_queue=11, w0={"queued_streams": 15})
    plan = run(make_spec(), NOW, flat(0, forecast=0), signals, make_state(1))
    assert plan.observed_demand == 31
    assert plan.desired_replicas == 4


def test_exact_multiple_of_streams_per_replica_is_not_rounded_up() -> None:
    plan = run(make_spec(), NOW, flat(30.000000000001, forecast=0), None, make_state(3))
    assert plan.desired_replicas == 3


@pytest.mark.parametrize(("demand", "expected", "code"), [(0, 2, "ClampedToMin"), (500, 8, "ClampedToMax")])
def test_min_and_max_clamp_the_target(demand: float, expected: int, code: str) -> None:
    spec = make_spec(replicas={"min": 2, "max": 8})
    state = make_state(2 if demand else 8)
    plan = run(spec, NOW, flat(demand), make_signals({"w0": int(demand)}), state)
    if demand:
        assert plan.desired_replicas == expected
    else:  # the minimum is held: nothing to drain below it
        assert plan.desired_replicas == 8 and len(plan.drain) == 1
        state = make_state(2)
        plan = run(spec, NOW, flat(demand), make_signals({"w0": 0}), state)
        assert plan.desired_replicas == expected and not plan.drain
    assert code in codes(plan)


def test_below_min_scales_up_to_min() -> None:
    spec = make_spec(replicas={"min": 3, "max": 8})
    plan = run(spec, NOW, flat(0), make_signals({}), make_state(0))
    assert plan.desired_replicas == 3


def test_pending_and_starting_pods_count_as_capacity_on_its_way() -> None:
    pods = (
        *ready_pods(2),
        cluster.PodState(name="p0", phase="pending", created_s=NOW - 30),
        cluster.PodState(name="p1", phase="starting", created_s=NOW - 90, scheduled_s=NOW - 60),
    )
    state = make_state(4, pods=pods)
    plan = run(make_spec(), NOW, flat(35, forecast=38), make_signals({"w0": 18, "w1": 17}), state)
    assert plan.desired_replicas == 4
    assert "ScaleUp" not in codes(plan)
    plan = run(make_spec(), NOW, flat(35, forecast=45), make_signals({"w0": 18, "w1": 17}), state)
    assert plan.desired_replicas == 5


def test_dry_run_policy_gets_the_same_plan() -> None:
    """decide() does not look at the mode: dryRun reports exactly what active would do."""
    history = flat(5, forecast=9)
    signals = make_signals({"w0": 5, "w1": 0, "w2": 0})
    pods = ready_pods(3, annotations={"w2": drained_at(NOW - 120)})
    state = make_state(3, pods=pods)
    active = run(make_spec(), NOW, history, signals, state)
    dry = run(make_spec(mode="dryRun"), NOW, history, signals, state)
    assert active == dry
    assert active.remove == ("w2",) and active.drain == ("w1",)


# --- horizon and provisioner -------------------------------------------------------------------------------


def test_horizon_uses_priors_then_measured_lead_times() -> None:
    spec = make_spec(
        leadTime={"nodeProvisioningSeconds": 300, "podStartSeconds": 60, "modelLoadSeconds": 120}
    )
    assert decide.horizon_s(spec, make_state(1)) == 480
    measured = make_state(1, measured_node_provisioning_s=200.0, measured_model_load_s=40.0)
    assert decide.horizon_s(spec, measured) == 200 + 60 + 40
    assert decide.pod_horizon_s(spec, measured) == 100
    override = make_spec(leadTime={"horizonSeconds": 900})
    assert decide.horizon_s(override, make_state(1)) == 900
    assert decide.horizon_s(override, measured) == 200 + 60 + 40


def test_pods_provisioner_holds_no_gpus_apart() -> None:
    plan = run(make_spec(), NOW, flat(10, forecast=80), make_signals({"w0": 10}), make_state(1))
    assert plan.provision_gpus == 0 and plan.desired_replicas == 8


def test_buffer_provisioner_holds_nodes_for_the_far_peak_and_pods_for_the_near_one() -> None:
    spec = make_spec(
        provisioner={"type": "capacityBuffer"},
        capacity={"streamsPerReplica": SPR, "gpusPerReplica": 2},
        leadTime={"nodeProvisioningSeconds": 300, "podStartSeconds": 60, "modelLoadSeconds": 120},
    )
    # 8 steps of 60 s over a 480 s horizon: the pod horizon (180 s) is the first 3 steps.
    path = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0)
    history = make_history([10] * 20, forecast=80, path=path)
    plan = run(spec, NOW, history, make_signals({"w0": 10}), make_state(1))
    assert plan.desired_replicas == 3
    assert plan.provision_gpus == (8 - 3) * 2


# --- scale-down: stabilization, rate limit, choice, drain, remove --------------------------------------------


def test_scale_down_waits_for_stabilization_window() -> None:
    spec = make_spec()
    # 40 streams four minutes ago, 10 now: the 600 s window still holds 4 replicas.
    values = [40.0] * 16 + [10.0] * 4
    plan = run(spec, NOW, make_history(values, forecast=10), make_signals({"w0": 10}), make_state(4))
    assert plan.desired_replicas == 4 and not plan.drain
    assert "StabilizationWindow" in codes(plan)
    # Eleven minutes of 10 streams: the window has passed.
    values = [40.0] * 9 + [10.0] * 11
    sigs = make_signals({"w0": 10, "w1": 0, "w2": 0, "w3": 0})
    plan = run(spec, NOW, make_history(values, forecast=10), sigs, make_state(4))
    assert len(plan.drain) == 1 and "ScaleDown" in codes(plan)
    assert plan.desired_replicas == 4  # drained, not removed yet


def test_scale_down_needs_history_covering_the_window() -> None:
    plan = run(make_spec(), NOW, flat(0, minutes=5), make_signals({"w0": 0, "w1": 0}), make_state(2))
    assert not plan.drain
    assert any(r.code == "StabilizationWindow" and "covers" in r.message for r in plan.reasons)


def test_scale_down_holds_while_forecast_stays_above() -> None:
    plan = run(make_spec(), NOW, flat(10, forecast=38), make_signals({"w0": 10}), make_state(4))
    assert not plan.drain and plan.desired_replicas == 4


def test_scale_down_drains_pods_with_fewest_streams_and_sessions_first() -> None:
    spec = make_spec(
        scaleDown={"maxPodsPerMinute": 2, "stabilizationWindowSeconds": 600, "drainTimeoutSeconds": 300}
    )
    pods = (*ready_pods(4), cluster.PodState(name="p-new", phase="pending", created_s=NOW - 10))
    sigs = make_signals({"w0": 3, "w1": (0, 2), "w2": 1, "w3": (0, 0)})
    plan = run(spec, NOW, flat(4), sigs, make_state(5, pods=pods))
    # target 1: four surplus, two per minute; the pending pod (no streams) and the idle w3 go first.
    assert plan.drain == ("p-new", "w3")
    assert any(r.code == "ScaleDown" and "2 more later" in r.message for r in plan.reasons)


def test_max_pods_per_minute_counts_recent_drain_marks() -> None:
    spec = make_spec(
        scaleDown={"maxPodsPerMinute": 2, "stabilizationWindowSeconds": 600, "drainTimeoutSeconds": 300}
    )
    pods = ready_pods(
        6,
        annotations={"w4": drained_at(NOW - 30), "w5": drained_at(NOW - 50)},
    )
    sigs = make_signals({f"w{i}": 2 for i in range(6)})
    plan = run(spec, NOW, flat(1), sigs, make_state(6, pods=pods))
    assert not plan.drain and "ScaleDownRateLimited" in codes(plan)
    # One of the marks is now older than a minute: one more may go.
    pods = ready_pods(6, annotations={"w4": drained_at(NOW - 30), "w5": drained_at(NOW - 61)})
    plan = run(spec, NOW, flat(1), sigs, make_state(6, pods=pods))
    assert len(plan.drain) == 1


def test_terminating_pods_still_count_against_the_rate() -> None:
    spec = make_spec()
    gone = cluster.PodState(
        name="old", phase="terminating", created_s=NOW - 900, annotations=drained_at(NOW - 20)
    )
    state = make_state(3, pods=(*ready_pods(3), gone))
    plan = run(spec, NOW, flat(0), make_signals({"w0": 0, "w1": 0, "w2": 0}), state)
    assert not plan.drain and "ScaleDownRateLimited" in codes(plan)


def test_drained_pod_is_removed_when_empty_but_not_before_min_drain() -> None:
    sigs = make_signals({"w0": 5, "w1": 0})
    early = make_state(2, pods=ready_pods(2, annotations={"w1": drained_at(NOW - 20)}))
    plan = run(make_spec(), NOW, flat(5), sigs, early)
    assert plan.remove == () and plan.desired_replicas == 2 and "DrainWaiting" in codes(plan)
    later = make_state(2, pods=ready_pods(2, annotations={"w1": drained_at(NOW - decide.MIN_DRAIN_S)}))
    plan = run(make_spec(), NOW, flat(5), sigs, later)
    assert plan.remove == ("w1",) and plan.desired_replicas == 1 and "DrainComplete" in codes(plan)
    assert plan.deletion_cost["w1"] < plan.deletion_cost.get("w0", 0)
    assert plan.do_not_disrupt == {"w0": True, "w1": False}


def test_drain_timeout_removes_a_pod_that_still_carries_streams() -> None:
    sigs = make_signals({"w0": 5, "w1": (2, 1)})
    waiting = make_state(2, pods=ready_pods(2, annotations={"w1": drained_at(NOW - 299)}))
    plan = run(make_spec(), NOW, flat(7), sigs, waiting)
    assert plan.remove == () and plan.do_not_disrupt["w1"] is True
    timed_out = make_state(2, pods=ready_pods(2, annotations={"w1": drained_at(NOW - 300)}))
    plan = run(make_spec(), NOW, flat(7), sigs, timed_out)
    assert plan.remove == ("w1",) and plan.desired_replicas == 1
    assert any(r.code == "DrainTimeout" and "3 streams/sessions" in r.message for r in plan.reasons)
    assert plan.do_not_disrupt["w1"] is False


def test_ready_pod_unknown_to_the_balancer_waits_for_the_timeout() -> None:
    sigs = make_signals({"w0": 5})  # the balancer does not list w1: its load is unknown
    state = make_state(2, pods=ready_pods(2, annotations={"w1": drained_at(NOW - 120)}))
    assert run(make_spec(), NOW, flat(5), sigs, state).remove == ()
    state = make_state(2, pods=ready_pods(2, annotations={"w1": drained_at(NOW - 300)}))
    plan = run(make_spec(), NOW, flat(5), sigs, state)
    assert plan.remove == ("w1",) and "unknown number" in plan.reasons[-1].message


def test_deletion_cost_makes_exactly_the_removed_pods_go() -> None:
    """Other pods may carry negative costs (someone else's); ours must be lower still."""
    annotations = {
        "w0": {cluster.DELETION_COST_ANNOTATION: "-50"},
        "w2": drained_at(NOW - 100),
        "w3": {cluster.DELETION_COST_ANNOTATION: "7", **drained_at(NOW - 100)},
    }
    state = make_state(4, pods=ready_pods(4, annotations=annotations))
    sigs = make_signals({"w0": 5, "w1": 5, "w2": 0, "w3": 0})
    plan = run(make_spec(), NOW, flat(10, forecast=10), sigs, state)
    assert set(plan.remove) == {"w2", "w3"} and plan.desired_replicas == 2
    fake = FakeCluster(state)
    for pod, cost in plan.deletion_cost.items():
        fake.annotate(pod, {cluster.DELETION_COST_ANNOTATION: str(cost)})
    fake.set_replicas(plan.desired_replicas)
    assert {p.name for p in fake.current.pods} == {"w0", "w1"}


def test_deletion_cost_lifts_a_kept_pod_already_at_the_floor() -> None:
    annotations = {"w0": {cluster.DELETION_COST_ANNOTATION: str(-(2**31))}, "w1": drained_at(NOW - 100)}
    state = make_state(2, pods=ready_pods(2, annotations=annotations))
    plan = run(make_spec(), NOW, flat(5), make_signals({"w0": 5, "w1": 0}), state)
    assert plan.deletion_cost == {"w1": -(2**31), "w0": -(2**31) + 1}


def test_undrain_returns_marked_pods_before_adding_new_ones() -> None:
    annotations = {"w2": drained_at(NOW - 30), "w3": drained_at(NOW - 40)}
    state = make_state(4, pods=ready_pods(4, annotations=annotations))
    sigs = make_signals({"w0": 10, "w1": 10, "w2": 0, "w3": (3, 0)})
    plan = run(make_spec(), NOW, flat(23, forecast=25), sigs, state)
    # needs 3 serving, 2 serve: undrain one (w3, the one with streams), add none.
    assert plan.undrain == ("w3",) and plan.desired_replicas == 4 and "Undrain" in codes(plan)
    assert "ScaleUp" not in codes(plan)
    plan = run(make_spec(), NOW, flat(23, forecast=55), sigs, state)
    assert set(plan.undrain) == {"w2", "w3"} and plan.desired_replicas == 6


def test_drain_and_idle_annotations_follow_streams() -> None:
    sigs = make_signals({"w0": 4, "w1": (0, 1), "w2": 0})
    pods = (*ready_pods(3), cluster.PodState(name="p", phase="pending", created_s=NOW))
    plan = run(make_spec(), NOW, flat(4, forecast=30), sigs, make_state(4, pods=pods))
    assert plan.do_not_disrupt == {"w0": True, "w1": True, "w2": False, "p": False}


# --- hotspots -----------------------------------------------------------------------------------------------


HOT = {"hotspot": True, "hotspot_score": 2.5, "hotspot_reason": "sticky sessions"}


def test_session_bound_hotspot_adds_capacity() -> None:
    """21 streams fit 3 replicas evenly; two hot backends pin 5 each, the other 11 need 2 more: 4."""
    sigs = make_signals({"w0": (5, 5), "w1": (5, 4), "w2": 5, "w3": 6}, w0=HOT, w1=HOT)
    plan = run(make_spec(), NOW, flat(21, forecast=21), sigs, make_state(3))
    hot_reasons = [r for r in plan.reasons if r.code == "HotspotCapacity"]
    assert plan.desired_replicas == 4 and len(hot_reasons) == 1
    assert "w0 (5 sessions, 5 streams)" in hot_reasons[0].message and "w1" in hot_reasons[0].message


def test_hotspot_that_even_spreading_covers_adds_nothing() -> None:
    """One hot backend pins 9 of 11 streams: 1 + ceil(2/10) = 2 = ceil(11/10), nothing extra."""
    sigs = make_signals({"w0": (9, 8), "w1": 1, "w2": 1}, w0=HOT)
    plan = run(make_spec(), NOW, flat(11, forecast=11), sigs, make_state(2))
    assert plan.desired_replicas == 2 and "HotspotCapacity" not in codes(plan)


def test_hotspot_with_few_sessions_is_not_session_bound() -> None:
    sigs = make_signals({"w0": (5, 2), "w1": (5, 2), "w2": 5, "w3": 6}, w0=HOT, w1=HOT)
    plan = run(make_spec(), NOW, flat(21, forecast=21), sigs, make_state(3))
    assert plan.desired_replicas == 3 and "HotspotCapacity" not in codes(plan)


def test_hotspot_without_sessions_is_left_to_the_balancer() -> None:
    hot = {"hotspot": True, "hotspot_score": 2.5}
    sigs = make_signals({"w0": 5, "w1": 5, "w2": 5, "w3": 6}, w0=hot, w1=hot)
    plan = run(make_spec(), NOW, flat(21, forecast=21), sigs, make_state(3))
    assert plan.desired_replicas == 3 and "HotspotCapacity" not in codes(plan)


# --- missing and stale data ---------------------------------------------------------------------------------


def _draining_state() -> cluster.ClusterState:
    return make_state(4, pods=ready_pods(4, annotations={"w3": drained_at(NOW - 400)}))


@pytest.mark.parametrize(
    ("history", "signals", "code"),
    [
        (None, make_signals({"w0": 1}), "HistoryMissing"),
        (make_history([np.nan] * 20, forecast=1), make_signals({"w0": 1}), "HistoryMissing"),
        (make_history([1] * 20, forecast=1, fetched_s=NOW - 61), make_signals({"w0": 1}), "HistoryStale"),
        (make_history([1] * 15 + [np.nan] * 5, forecast=1), make_signals({"w0": 1}), "HistoryStale"),
        (make_history([1] * 20), make_signals({"w0": 1}), "ForecastMissing"),
        (make_history([1] * 20, forecast=1, forecast_at=NOW - 120), make_signals({"w0": 1}), "ForecastStale"),
        (flat(1), None, "SignalsMissing"),
        (flat(1), make_signals({"w0": 1}, time_s=NOW - 61), "SignalsStale"),
    ],
)
def test_missing_or_stale_data_holds_capacity(
    history: Demand | None, signals: decide.SignalsSnapshot | None, code: str
) -> None:
    """Demand is 1 stream and one pod is past its drain timeout: fresh data would drain and remove."""
    state = _draining_state()
    plan = run(make_spec(), NOW, history, signals, state)
    assert not plan.demand_data_available
    assert plan.reasons[0].code == code and plan.reasons[0].message
    assert "HoldingCapacity" in codes(plan)
    assert plan.desired_replicas == 4 and not plan.drain and not plan.remove
    assert plan.undrain == ("w3",)
    fresh = run(make_spec(), NOW, flat(1), make_signals({"w0": 1, "w3": 0}), state)
    assert fresh.demand_data_available and fresh.remove == ("w3",)


def test_missing_history_still_follows_fresh_signals_up() -> None:
    plan = run(make_spec(), NOW, None, make_signals({"w0": 20, "w1": 25}), make_state(2))
    assert plan.desired_replicas == 5 and not plan.demand_data_available


def test_a_policy_without_balancer_does_not_need_signals() -> None:
    spec = make_spec(demand={"prometheus": {"query": "sum(x)"}})
    plan = run(spec, NOW, flat(25, forecast=25), None, make_state(2))
    assert plan.demand_data_available and plan.desired_replicas == 3 and plan.do_not_disrupt == {}


def test_missing_data_keeps_provisioned_gpus() -> None:
    spec = make_spec(provisioner={"type": "placeholder"})
    state = dataclasses.replace(make_state(2), provisioned_gpus=6)
    plan = run(spec, NOW, None, make_signals({"w0": 1}), state)
    assert plan.provision_gpus == 6


def test_forecast_without_computed_time_is_as_fresh_as_its_history() -> None:
    history = flat(10, forecast=30)
    assert history.forecast is not None
    unstamped = history._replace(forecast=dataclasses.replace(history.forecast, computed_s=0.0))
    plan = run(make_spec(), NOW, unstamped, make_signals({"w0": 10}), make_state(1))
    assert plan.demand_data_available and plan.desired_replicas == 3


def test_every_reason_code_is_declared() -> None:
    plans = [
        run(make_spec(), NOW, None, None, _draining_state()),
        run(make_spec(), NOW, flat(1), make_signals({"w0": 1, "w3": 0}), _draining_state()),
        run(make_spec(), NOW, flat(500), make_signals({"w0": 500}), make_state(1)),
    ]
    for plan in plans:
        assert plan.reasons
        for reason in plan.reasons:
            assert reason.code in decide.REASON_CODES and reason.message


def test_signals_missing_a_replica_raise_but_never_lower() -> None:
    """One balancer replica did not answer: its streams are missing, so the figures are a lower bound."""
    partial = dataclasses.replace(make_signals({"w0": 35, "w3": 0}), unreachable=("10.1.0.2:8081",))
    state = _draining_state()
    plan = run(make_spec(), NOW, flat(1), partial, state)
    assert not plan.demand_data_available and plan.reasons[0].code == "SignalsIncomplete"
    assert "10.1.0.2:8081" in plan.reasons[0].message
    assert plan.desired_replicas == 4 and not plan.remove and not plan.drain
    assert plan.do_not_disrupt == {"w0": True}  # zero from some replicas is not idle: no False marks
    plan = run(make_spec(), NOW, flat(1), partial, make_state(2))
    assert plan.desired_replicas == 4  # 35 seen streams still need 4 replicas


def test_scale_down_empties_the_emptiest_node_first() -> None:
    """A GPU node is billed until its last pod goes: its lone pod is drained before idle pods on full nodes."""
    spec = make_spec(
        scaleDown={"maxPodsPerMinute": 2, "stabilizationWindowSeconds": 600, "drainTimeoutSeconds": 300}
    )
    placement = {"w0": "n1", "w1": "n1", "w2": "n1", "w3": "n2", "w4": "n3", "w5": "n3"}
    pods = tuple(dataclasses.replace(p, node=placement[p.name]) for p in ready_pods(6))
    sigs = make_signals({"w0": 0, "w1": 0, "w2": 0, "w3": 4, "w4": 3, "w5": 2})
    nodes = tuple(
        cluster.NodeState(name=n, gpus=8, ready=True, created_s=NOW - 7200) for n in ("n1", "n2", "n3")
    )
    plan = run(spec, NOW, flat(9), sigs, make_state(6, pods=pods, nodes=nodes))
    # 9 streams need 1 replica; two may go this minute: n2's only pod, then n3's less loaded one.
    assert plan.drain == ("w3", "w5")


def test_undrain_prefers_pods_on_full_nodes() -> None:
    """The lone pod of a node being emptied stays drained; one on a full node comes back."""
    placement = {"w0": "n1", "w1": "n1", "w2": "n1", "w3": "n2"}
    annotations = {"w2": drained_at(NOW - 30), "w3": drained_at(NOW - 30)}
    pods = tuple(
        dataclasses.replace(p, node=placement[p.name]) for p in ready_pods(4, annotations=annotations)
    )
    sigs = make_signals({"w0": 10, "w1": 10, "w2": 0, "w3": 2})
    plan = run(make_spec(), NOW, flat(23, forecast=25), sigs, make_state(4, pods=pods))
    assert plan.undrain == ("w2",)
