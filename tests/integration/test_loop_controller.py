"""The reconcile loop against the in-test API server: scale, drain, dry-run, invalid policies, conflicts.

Demand comes from a scripted `DemandSource` (the loop's seam to the demand layer); the decision is the real
`decide()`, the cluster the real `KubeCluster` through the real `kubernetes` client. Time is a FakeClock
shared with the API server, so creation and transition timestamps agree with what the loop sees.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from contract import clock as clock_mod
from contract import signals as signals_mod
from controller import cluster, crd, decide, loop, metrics, pipeline, policy
from controller.kube import api as kube_api_mod
from tests.fakes import crd_schema, kube_api
from tests.fakes.cluster import FakeCluster
from tests.fakes.kube_api import FakeKubeApi

NS = "llm"
STEP_S = 60.0


class ScriptedDemand:
    """Demand the test sets: a flat history at `level[policy]`, a forecast, and per-pod streams.

    It is the loop's `DemandSource`, and (through `forecaster`) its forecast factory: the forecast of a policy
    is `forecast[policy]` (default its level), whatever the history says.
    """

    def __init__(self, clock: clock_mod.FakeClock) -> None:
        self.clock = clock
        self.level: dict[str, float] = {}
        self.forecast: dict[str, float] = {}
        self.streams: dict[str, int] = {}
        """Pod name -> active streams the balancer reports on it."""
        self.history_s = 3600.0
        self.available = True
        self.reads = 0

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        self.reads += 1
        if not self.available:
            return pipeline.DemandReading(None, None, ("scripted outage",))
        level = self.level.get(scaling_policy.metadata.name, 0.0)
        stamps = np.arange(now - self.history_s, now + 1e-9, STEP_S)
        history = decide.DemandHistory(
            step_s=STEP_S, timestamps=stamps, values=np.full(stamps.shape, level), fetched_s=now
        )
        backends = {
            f"10.0.0.{i}:8000": signals_mod.BackendSignals(
                address=f"10.0.0.{i}:8000", pod=pod, state="ready", active_streams=count
            )
            for i, (pod, count) in enumerate(sorted(self.streams.items()))
        }
        signals = decide.SignalsSnapshot(time_s=now, backends=backends)
        return pipeline.DemandReading(history, signals)

    def forecaster(self, scaling_policy: policy.ScalingPolicy) -> ScriptedForecast:
        return ScriptedForecast(self, scaling_policy)


class ScriptedForecast:
    """One policy's scripted forecast: `forecast[name]`, a straight ramp from the level to it as the path."""

    def __init__(self, demand: ScriptedDemand, scaling_policy: policy.ScalingPolicy) -> None:
        self.demand = demand
        self.name = scaling_policy.metadata.name
        self.settings = scaling_policy.spec.forecast
        self.error_: str | None = None
        self.last_: decide.PeakForecast | None = None

    def peak(
        self, timestamps: np.ndarray, values: np.ndarray, *, now: float, horizon_s: float
    ) -> decide.PeakForecast | None:
        level = self.demand.level.get(self.name, 0.0)
        peak = self.demand.forecast.get(self.name, level)
        self.last_ = decide.PeakForecast(
            value=peak,
            quantile=self.settings.quantile,
            horizon_s=horizon_s,
            model="scripted",
            computed_s=now,
            path=tuple(float(x) for x in np.linspace(level, peak, max(1, math.ceil(horizon_s / STEP_S)))),
        )
        return self.last_


class Env:
    def __init__(self, api: FakeKubeApi, clock: clock_mod.FakeClock, **controller: Any) -> None:
        self.api = api
        self.clock = clock
        self.demand = ScriptedDemand(clock)
        self.client = kube_api_mod.client_for(api.url)
        self.registry = CollectorRegistry()
        self.controller = loop.Controller(
            self.client,
            demand=self.demand,
            clock=clock,
            controller_metrics=metrics.ControllerMetrics(self.registry),
            namespace=NS,
            identity="test-controller",
            forecasts=self.demand.forecaster,
            **controller,
        )

    def status(self, name: str) -> dict[str, Any]:
        obj = self.api.get("forestall.dev", "scalingpolicies", NS, name)
        assert obj is not None
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        return next(c for c in self.status(name).get("conditions", []) if c["type"] == kind)

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.api.objects("events.k8s.io", "events", NS)
            if reason is None or e["reason"] == reason
        ]

    def replicas(self, name: str) -> int:
        obj = self.api.get("apps", "deployments", NS, name)
        assert obj is not None
        return int(obj["spec"]["replicas"])

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"namespace": NS, **labels})

    def writes(self) -> set[tuple[str, str, str]]:
        return {rule for rule in self.api.rbac_rules() if rule[2] not in ("get", "list", "watch")}

    async def reconcile(self) -> loop.CycleResult:
        return await self.controller.reconcile_all()

    async def settle(self) -> None:
        """Let the controller's watches catch up with what the test wrote to the API server."""
        rv = self.api.resource_version
        await kube_api.eventually(
            lambda: all(
                int(inf.resource_version or 0) >= rv
                for inf in (self.controller.policies, *self.controller.caches.all)
            ),
            "watches caught up",
        )


@pytest.fixture
async def make_env() -> AsyncIterator[Any]:
    made: list[Env] = []
    servers: list[FakeKubeApi] = []

    async def make(**controller: Any) -> Env:
        clock = clock_mod.FakeClock(start=1_800_000_000.0)
        api = await FakeKubeApi(clock=clock, bookmark_interval_s=0.1).__aenter__()
        servers.append(api)
        env = Env(api, clock, **controller)
        made.append(env)
        return env

    yield make
    for env in made:
        await env.controller.close()
        env.client.close()
        assert env.api.rejected == [], env.api.rejected
    for api in servers:
        await api.__aexit__(None, None, None)


async def start(env: Env) -> None:
    await env.controller.start()
    await env.settle()


def ready_pods(env: Env, name: str, count: int) -> list[str]:
    env.api.put(kube_api.deployment(name, NS, replicas=count))
    env.api.run_workloads()
    pods = sorted(
        p["metadata"]["name"]
        for p in env.api.objects("", "pods", NS)
        if p["metadata"]["labels"].get("app") == name
    )
    for pod in pods:
        env.api.set_pod_state(NS, pod, node="gpu-a", running=True, ready=True)
    return pods


async def test_scale_up_writes_scale_status_event_and_metrics(make_env: Any) -> None:
    env = await make_env()
    ready_pods(env, "chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 45.0  # 10 streams per replica: 5 replicas
    await start(env)

    result = await env.reconcile()

    assert (result.reconciled, result.failed) == (1, 0)
    assert env.replicas("chat") == 5
    status = env.status("chat")
    assert status["desiredReplicas"] == 5
    assert status["observedDemand"] == 45.0
    assert status["forecast"]["model"] == "scripted"
    assert status["lastScaleReason"] == "ScaleUp"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "DemandDataAvailable": "True",
        "Forecasting": "True",
        "Degraded": "False",
    }
    stored = env.api.get("forestall.dev", "scalingpolicies", NS, "chat")
    assert crd_schema.validate(crd_schema.crd_schema(crd.definition()), stored) == []
    [event] = env.events("ScaleUp")
    assert "from 2 to 5 replicas" in event["note"]
    assert event["regarding"]["kind"] == "ScalingPolicy" and event["regarding"]["name"] == "chat"
    assert env.metric("forestall_controller_desired_replicas", policy="chat") == 5
    assert env.metric("forestall_controller_current_replicas", policy="chat") == 2
    assert env.metric("forestall_controller_observed_demand_streams", policy="chat") == 45
    assert env.metric("forestall_controller_forecast_streams", policy="chat", quantile="0.95") == 45
    assert env.metric("forestall_controller_decisions_total", policy="chat", reason="ScaleUp") == 1
    assert env.metric("forestall_controller_demand_data_available", policy="chat") == 1
    assert env.registry.get_sample_value("forestall_controller_reconcile_duration_seconds_count") == 1

    # once steady, the same plan again changes nothing: no scale call, no status write, no new event
    await env.settle()
    await env.reconcile()
    assert env.replicas("chat") == 5
    assert env.condition("chat", "Ready")["message"].startswith("ReactiveFloor")
    writes_before = len([c for c in env.api.recorded_calls if c.verb in ("update", "patch", "create")])
    await env.settle()
    await env.reconcile()
    assert (
        len([c for c in env.api.recorded_calls if c.verb in ("update", "patch", "create")]) == writes_before
    )


async def test_invalid_policy_gets_invalid_spec_and_an_event_while_others_reconcile(make_env: Any) -> None:
    env = await make_env()
    ready_pods(env, "good", 1)
    ready_pods(env, "bad", 3)
    env.api.put(kube_api.scaling_policy("good", NS))
    bad = kube_api.scaling_policy("bad", NS)
    env.api.put(bad)
    env.demand.level.update(good=25.0, bad=55.0)
    await start(env)
    await env.reconcile()
    assert env.replicas("bad") == 6  # a valid plan, applied

    # stored under an older, looser schema: the CEL rule would now refuse it
    bad["spec"]["replicas"] = {"min": 9, "max": 2}
    env.api.put(bad, validate=False)
    env.demand.level["bad"] = 5.0
    await env.settle()
    result = await env.reconcile()

    assert result.failed == 0
    assert env.replicas("good") == 3
    assert env.replicas("bad") == 6  # the last valid plan is kept: nothing done to the target
    ready = env.condition("bad", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "replicas.min must be <= replicas.max, got min=9 max=2" in ready["message"]
    [event] = env.events("InvalidSpec")
    assert event["type"] == "Warning" and "replicas.min" in event["note"]
    assert env.condition("good", "Ready")["status"] == "True"


async def test_dry_run_computes_and_reports_but_changes_nothing(make_env: Any) -> None:
    env = await make_env()
    pods = ready_pods(env, "chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS, mode="dryRun"))
    env.demand.level["chat"] = 45.0
    env.demand.streams = dict.fromkeys(pods, 3)
    await start(env)
    calls_before = len(env.api.recorded_calls)

    await env.reconcile()

    assert env.replicas("chat") == 2
    assert env.writes() == {
        ("forestall.dev", "scalingpolicies/status", "patch"),
        ("events.k8s.io", "events", "create"),
    }
    assert all(
        c.verb in ("get", "list", "watch") or c.resource in ("scalingpolicies", "events")
        for c in env.api.recorded_calls[calls_before:]
    )
    [event] = env.events("ScaleUp")
    assert event["note"].startswith("dry run, would have scaled Deployment llm/chat from 2 to 5")
    assert env.status("chat")["desiredReplicas"] == 5
    assert env.status("chat")["currentReplicas"] == 2
    for pod in pods:
        stored = env.api.get("", "pods", NS, pod)
        assert stored is not None and cluster.DO_NOT_DISRUPT_ANNOTATION not in (
            stored["metadata"].get("annotations") or {}
        )


async def test_dry_run_override_holds_every_policy(make_env: Any) -> None:
    env = await make_env(dry_run=True)
    ready_pods(env, "chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 45.0
    await start(env)
    await env.reconcile()
    assert env.replicas("chat") == 2
    assert ("apps", "deployments/scale", "update") not in env.writes()
    assert env.status("chat")["desiredReplicas"] == 5


async def test_drain_then_remove_only_empty_pods_cuts_no_stream(make_env: Any) -> None:
    """Demand drops: pods are drained fewest-streams first and removed only once the balancer sees them empty."""
    env = await make_env()
    pods = ready_pods(env, "chat", 3)
    env.api.put(
        kube_api.scaling_policy(
            "chat",
            NS,
            demand={"balancer": {"service": "balancer"}, "prometheus": {"query": "sum(streams)"}},
            scaleDown={"stabilizationWindowSeconds": 120, "drainTimeoutSeconds": 120, "maxPodsPerMinute": 1},
        )
    )
    busy, idle, light = pods
    env.demand.streams = {busy: 6, idle: 0, light: 2}
    env.demand.level["chat"] = 8.0  # one replica's worth
    await start(env)
    cut: list[int] = []

    async def cycle(seconds: float) -> None:
        env.clock.advance(seconds)
        before = {p["metadata"]["name"] for p in env.api.objects("", "pods", NS)}
        await env.reconcile()
        env.api.run_workloads()
        after = {p["metadata"]["name"] for p in env.api.objects("", "pods", NS)}
        cut.extend(env.demand.streams.pop(gone, 0) for gone in before - after)
        await env.settle()

    await cycle(0)
    marked = [
        p
        for p in pods
        if cluster.DRAIN_ANNOTATION
        in ((env.api.get("", "pods", NS, p) or {}).get("metadata", {}).get("annotations") or {})
    ]
    assert marked == [idle]  # fewest streams first, one per minute
    assert env.events("Drain") and idle in env.events("Drain")[0]["note"]
    dnd = {
        p: ((env.api.get("", "pods", NS, p) or {})["metadata"].get("annotations") or {}).get(
            cluster.DO_NOT_DISRUPT_ANNOTATION
        )
        for p in pods
    }
    assert dnd == {
        busy: "true",
        idle: None,
        light: "true",
    }  # Karpenter must not consolidate nodes with streams

    for _ in range(12):  # three minutes of 15 s cycles
        await cycle(15)
        if light in env.demand.streams and cluster.DRAIN_ANNOTATION in (
            (env.api.get("", "pods", NS, light) or {})["metadata"].get("annotations") or {}
        ):
            env.demand.streams[light] = 0  # its last streams finish while it drains
    assert idle not in {p["metadata"]["name"] for p in env.api.objects("", "pods", NS)}
    assert light not in {p["metadata"]["name"] for p in env.api.objects("", "pods", NS)}
    assert env.replicas("chat") == 1
    assert cut == [0, 0]  # two pods removed, no stream on either
    assert env.events("RemovePods")
    assert env.metric("forestall_controller_drains_total", policy="chat") == 2


async def test_missing_demand_holds_capacity_and_says_why(make_env: Any) -> None:
    env = await make_env()
    ready_pods(env, "chat", 4)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.available = False
    await start(env)
    await env.reconcile()
    assert env.replicas("chat") == 4
    cond = env.condition("chat", "DemandDataAvailable")
    assert (cond["status"], cond["reason"]) == ("False", "HistoryMissing")
    assert env.condition("chat", "Forecasting")["status"] == "False"
    assert env.metric("forestall_controller_demand_data_available", policy="chat") == 0


async def test_a_conflict_requeues_without_counting_an_error(make_env: Any) -> None:
    env = await make_env()
    ready_pods(env, "chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 45.0
    await start(env)
    env.api.inject_error("PUT", r"/deployments/chat/scale$", 409, times=3)
    result = await env.reconcile()
    assert result.failed == 0
    assert env.replicas("chat") == 2
    assert env.metric("forestall_controller_reconcile_errors_total", policy="chat") is None
    assert env.controller._requeue == {(NS, "chat")}
    await env.reconcile()
    assert env.replicas("chat") == 5


async def test_missing_target_is_reported_and_counted(make_env: Any) -> None:
    env = await make_env()
    env.api.put(kube_api.scaling_policy("ghost", NS))
    await start(env)
    result = await env.reconcile()
    assert result.failed == 1
    ready = env.condition("ghost", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "TargetNotFound")
    assert env.events("TargetNotFound")
    assert env.metric("forestall_controller_reconcile_errors_total", policy="ghost") == 1


async def test_run_reconciles_on_change_and_on_interval_and_stops(make_env: Any) -> None:
    env = await make_env(interval_s=15.0)
    ready_pods(env, "chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 15.0
    stop = asyncio.Event()
    task = asyncio.create_task(env.controller.run(stop))
    try:
        await kube_api.eventually(lambda: env.controller.cycles >= 1, "first cycle")
        await kube_api.eventually(
            lambda: env.replicas("chat") == 2 and "desiredReplicas" in env.status("chat"), "status"
        )
        reads = env.demand.reads
        # a spec change (new generation) is reconciled without waiting for the interval
        changed = kube_api.scaling_policy("chat", NS, replicas={"min": 4, "max": 20})
        env.api.put(changed)
        await kube_api.eventually(lambda: env.replicas("chat") == 4, "reconciled on change")
        assert env.controller.cycles == 1
        # status writes by the controller itself do not trigger reconciles
        await env.settle()
        assert env.demand.reads == reads + 1
        env.clock.advance(15.0)
        await kube_api.eventually(lambda: env.controller.cycles == 2, "second cycle on the interval")
        assert env.metric("forestall_controller_desired_replicas", policy="chat") == 4
        # a deleted policy's series are dropped
        env.api.delete("forestall.dev", "scalingpolicies", NS, "chat")
        await kube_api.eventually(
            lambda: env.metric("forestall_controller_desired_replicas", policy="chat") is None,
            "series dropped",
        )
    finally:
        stop.set()
        await task
    assert task.done() and task.exception() is None


async def test_a_failing_reconcile_costs_one_policy_not_the_controller(make_env: Any) -> None:
    """Regression guard: an unexpected exception in one policy's reconcile must not end the cycle."""

    def brittle(spec: policy.ScalingPolicySpec, now: float, **inputs: Any) -> decide.Plan:
        if spec.scale_target_ref.name == "broken":
            raise RuntimeError("a bug in one policy's decision")
        return decide.decide(spec, now, **inputs)

    env = await make_env(decide_fn=brittle)
    ready_pods(env, "broken", 1)
    ready_pods(env, "fine", 1)
    env.api.put(kube_api.scaling_policy("broken", NS))
    env.api.put(kube_api.scaling_policy("fine", NS))
    env.demand.level.update(broken=35.0, fine=35.0)
    await start(env)
    result = await env.reconcile()
    assert (result.reconciled, result.failed) == (2, 1)
    assert env.replicas("fine") == 4 and env.replicas("broken") == 1
    assert env.metric("forestall_controller_reconcile_errors_total", policy="broken") == 1


async def test_an_overwritten_deletion_cost_is_reported_as_degraded(make_env: Any) -> None:
    """Someone else (Karpenter's pod-deletion-cost management, say) rewrites the cost Forestall set once."""
    env = await make_env()
    pods = ready_pods(env, "chat", 2)

    def mark_first(spec: policy.ScalingPolicySpec, now: float, **inputs: Any) -> decide.Plan:
        plan = decide.decide(spec, now, **inputs)
        state: cluster.ClusterState = inputs["state"]
        return dataclasses.replace(plan, desired_replicas=state.spec_replicas, deletion_cost={pods[0]: -5})

    env.controller.decide_fn = mark_first
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 15.0
    await start(env)
    await env.reconcile()
    stored = env.api.get("", "pods", NS, pods[0])
    assert stored is not None and stored["metadata"]["annotations"][cluster.DELETION_COST_ANNOTATION] == "-5"
    assert env.condition("chat", "Degraded")["status"] == "False"

    stored["metadata"]["annotations"][cluster.DELETION_COST_ANNOTATION] = "1000"
    env.api.put(stored)
    await env.settle()
    await env.reconcile()

    degraded = env.condition("chat", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "DeletionCostOverwritten")
    assert pods[0] in degraded["message"]
    [event] = env.events("DeletionCostOverwritten")
    assert event["type"] == "Warning" and "now 1000" in event["note"]
    stored = env.api.get("", "pods", NS, pods[0])
    assert (
        stored is not None and stored["metadata"]["annotations"][cluster.DELETION_COST_ANNOTATION] == "1000"
    )


async def test_the_loop_reconciles_whatever_cluster_the_factory_gives(make_env: Any) -> None:
    """The loop builds no `KubeCluster` itself: with a factory, its pipeline acts on the cluster it returns,
    and the status still reaches the API server."""
    now = 1_800_000_000.0
    pod = cluster.PodState(name="w0", phase="ready", created_s=now - 3600, ready_s=now - 3000, node="n0")
    fake = FakeCluster(cluster.ClusterState(spec_replicas=1, pods=(pod,)), now_s=now)
    made: list[tuple[str, object]] = []

    def factory(parsed: policy.ScalingPolicy, current: cluster.Cluster | None) -> cluster.Cluster:
        made.append((parsed.metadata.name, current))
        return fake

    env = await make_env(cluster_factory=factory)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 35.0
    await start(env)
    await env.reconcile()
    assert made == [("chat", None)]
    assert fake.names("set_replicas") == [(4,)]
    assert env.status("chat")["desiredReplicas"] == 4
    assert env.condition("chat", "Ready")["status"] == "True"
