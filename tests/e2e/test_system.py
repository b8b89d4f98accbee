"""Forestall end to end: real Prometheus, real balancer, emulated GPU backends, the controller on Kubernetes.

One run of the whole system (the `system_run` fixture, once per module; the wiring and the load phases are
in `tests.fakes.e2e_system`) and one test per claim:

- the in-test Kubernetes API server (`tests.fakes.kube_api`) holds the worker Deployment, its pods and
  EndpointSlices, the balancer Service's EndpointSlice and the ScalingPolicy; `tests.fakes.e2e_kubelet`
  plays the ReplicaSet (its removal order: among Ready pods, the lowest pod-deletion-cost first), the
  kubelet (each pod's container is an in-process emulated GPU server on its own loopback port, started and
  stopped with the pod) and the EndpointSlice controller;
- the balancer (`balancer.app`, in process) discovers the workers through those EndpointSlices and their
  pods' drain annotations (the Kubernetes watch, not a static file) and serves `/signals` and `/metrics`;
- the controller (`controller.loop.Controller` with `KubeCluster`) reads demand from a real Prometheus
  (Debian's `/usr/bin/prometheus` on loopback) with the policy's PromQL over the balancer's
  `forestall_balancer_active_streams`, and live signals from the balancer found through its Service's
  EndpointSlice; its metrics are served on loopback too, and Prometheus scrapes both every second;
- a load generator (`tests.fakes.e2e_load`) sends streaming completions through the balancer: a low
  rate, a ramp to a peak, a hold, a drop; it counts how every stream ended.

Then: Prometheus is stopped (with the load stopped, so a scale-down would follow if data were there).

Time compression (everything runs on the real clock, because Prometheus stores real timestamps): a one-second
forecast step and reconcile interval, lead-time priors of seconds, a 15 s stabilization window, a 5 s
staleness limit, and `decide.MIN_DRAIN_S` (the 60 s a drain mark stays before removal, so every balancer
replica sees it) shortened to `tests.fakes.e2e_system.MIN_DRAIN_S`, because it is a module constant, not a policy field.
The balancer here sees the mark within a watch round trip (milliseconds), which the drain test checks.

Assertions compare the order of recorded events (when capacity was asked for against when demand needed
it) and counts; nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from controller import cluster, decide
from dashboards import generate
from tests.fakes import prometheus
from tests.fakes.e2e_system import (
    CLIENT_GONE_REASONS,
    MIN_DRAIN_S,
    OUTAGE_CYCLES,
    Run,
    run_system,
)

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def system_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Run the whole system once for the module's tests (a few minutes of real time)."""
    prometheus.require_prometheus()
    run = Run()
    tmp = tmp_path_factory.mktemp("e2e")

    async def main() -> None:
        try:
            await run_system(tmp, run)
        finally:
            current = asyncio.current_task()
            run.leftover_tasks = [repr(t) for t in asyncio.all_tasks() if t is not current and not t.done()]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decide, "MIN_DRAIN_S", MIN_DRAIN_S)
        asyncio.run(main())
    (tmp / "summary.txt").write_text(run.summary())
    print(f"\n{run.summary()}")  # shown with `pytest -s`: the figures the report quotes
    yield run


# --- the claims -----------------------------------------------------------------------------------------------


def test_the_ramp_gets_capacity_before_demand_needs_it(system_run: Run) -> None:
    run = system_run
    assert run.needed_replicas >= 3, (
        f"the ramp should need several replicas, peak was {run.peak_streams} streams"
    )
    assert run.demand_needed_s is not None and run.demand_peak_s is not None
    assert run.replicas_up_s is not None, (
        f"the Deployment never asked for {run.needed_replicas} replicas: {run.history()}"
    )
    assert run.replicas_up_s < run.demand_needed_s, (
        f"{run.needed_replicas} replicas were asked for {run.replicas_up_s - run.demand_needed_s:.1f} s after "
        f"demand first needed them ({run.peak_streams} streams at peak): {run.history()}"
    )
    assert run.replicas_up_s < run.demand_peak_s
    assert run.policy_range_queries >= 10, "the controller should read its demand history from Prometheus"
    assert run.decisions["ForecastPeak"] > 0
    assert any("ForecastPeak" in note for note in run.scale_up_notes), run.scale_up_notes


def test_the_drop_drains_then_removes_only_idle_pods_without_cutting_a_stream(system_run: Run) -> None:
    run = system_run
    assert run.stage_reached != "start", run.stage_reached
    assert run.removed_after_drop, f"no pod was removed after the drop: {run.history()}"
    assert run.replicas_after_drop <= run.replicas_at_drop // 2, run.history()
    for removal in run.removed:
        assert cluster.DRAIN_ANNOTATION in removal.annotations, (
            f"{removal.pod} was removed without a drain mark"
        )
        assert int(removal.annotations.get(cluster.DELETION_COST_ANNOTATION, "0")) < 0, (
            f"{removal.pod} was removed without the lowest deletion cost: {removal.annotations}"
        )
        assert removal.streams_left == 0, f"{removal.pod} still carried {removal.streams_left} streams"
        assert run.drain_seen_by_balancer.get(removal.pod), f"the balancer never drained {removal.pod}"
    assert run.drains_total >= len(run.removed)
    out = run.outcomes
    assert out.started > 100, out
    assert (out.cut, out.error, out.rejected) == (0, 0, 0), out.errors[:5]
    assert out.abandoned == 1
    assert out.ok == out.started - out.abandoned
    assert set(run.balancer_failures) <= CLIENT_GONE_REASONS, run.balancer_failures
    assert sum(run.balancer_failures.values()) == out.abandoned


def test_losing_prometheus_holds_capacity_and_says_so(system_run: Run) -> None:
    run = system_run
    assert run.stage_reached == "outage observed", run.stage_reached
    assert run.outage_cycles >= OUTAGE_CYCLES, "the controller should have kept reconciling during the outage"
    assert run.outage_condition["status"] == "False"
    assert run.outage_condition["reason"] == "HistoryStale", run.outage_condition
    lowered = [
        (t - run.load_origin_s, n)
        for t, n in run.replica_history
        if t >= run.outage_stopped_s and n < run.outage_replicas_before
    ]
    assert lowered == [], f"replicas lowered during the outage: {lowered}\n{run.history()}"
    assert run.outage_replicas_after >= run.outage_replicas_before
    assert run.outage_marked_pods == []
    assert run.demand_data_available_metric == 0.0
    assert any("Prometheus" in e for e in run.demand_errors), run.demand_errors


def test_every_dashboard_panel_returns_live_data(system_run: Run) -> None:
    run = system_run
    assert run.panels, f"the dashboards were not queried (the run stopped at {run.stage_reached!r})"
    assert len(run.panels) == len(generate.queries())
    empty = [
        f"{p.dashboard} / {p.panel}: {p.expr} ({p.error or 'no data'})" for p in run.panels if not p.points
    ]
    assert empty == [], "\n".join(empty)
    assert run.reconcile_errors_total >= 1


def test_nothing_is_left_running(system_run: Run) -> None:
    assert system_run.leftover_tasks == []
