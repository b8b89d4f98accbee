"""The loop survives what a real cluster does to it: failing writes, throttling, a crashed elector, SIGTERM.

Against the in-test API server with injected faults; time is a FakeClock shared with the server, so backoff
delays and lease timings are driven by `advance()`, never waited for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from contract import clock as clock_mod
from controller import decide, loop, metrics, pipeline, policy
from controller.kube import api as kube_api_mod
from controller.kube import lease, reporting
from tests.fakes import kube_api
from tests.fakes.kube_api import FakeKubeApi, advance_until, eventually

NS = "llm"
LEASE = {"lease_duration_s": 6.0, "renew_deadline_s": 4.0, "retry_period_s": 1.0}


class Level:
    """Flat demand at `level[policy]`: an hour of history at that level and, through `forecaster` (the loop's
    forecast factory), a forecast of the same level."""

    def __init__(self) -> None:
        self.level: dict[str, float] = {}

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        import numpy as np

        value = self.level.get(scaling_policy.metadata.name, 0.0)
        stamps = np.arange(now - 3600.0, now + 1e-9, 60.0)
        history = decide.DemandHistory(
            step_s=60.0, timestamps=stamps, values=np.full(stamps.shape, value), fetched_s=now
        )
        return pipeline.DemandReading(history, None)

    def forecaster(self, scaling_policy: policy.ScalingPolicy) -> FlatForecast:
        return FlatForecast(self, scaling_policy)


class FlatForecast:
    """One policy's forecast: its current level, flat over the horizon."""

    def __init__(self, demand: Level, scaling_policy: policy.ScalingPolicy) -> None:
        self.demand = demand
        self.name = scaling_policy.metadata.name
        self.settings = scaling_policy.spec.forecast
        self.error_: str | None = None
        self.last_: decide.PeakForecast | None = None

    def peak(self, timestamps: Any, values: Any, *, now: float, horizon_s: float) -> decide.PeakForecast:
        value = self.demand.level.get(self.name, 0.0)
        self.last_ = decide.PeakForecast(
            value=value,
            quantile=self.settings.quantile,
            horizon_s=horizon_s,
            model="flat",
            computed_s=now,
            path=(value,),
        )
        return self.last_


class Env:
    def __init__(self, api: FakeKubeApi, clock: clock_mod.FakeClock, **controller: Any) -> None:
        self.api, self.clock = api, clock
        self.demand = Level()
        self.client = kube_api_mod.client_for(api.url)
        self.registry = CollectorRegistry()
        self.controller = loop.Controller(
            self.client,
            demand=self.demand,
            forecasts=self.demand.forecaster,
            clock=clock,
            controller_metrics=metrics.ControllerMetrics(self.registry),
            namespace=NS,
            identity="a",
            **controller,
        )

    def errors(self, name: str) -> float:
        value = self.registry.get_sample_value(
            "forestall_controller_reconcile_errors_total", {"namespace": NS, "policy": name}
        )
        return value or 0.0

    def replicas(self, name: str) -> int:
        obj = self.api.get("apps", "deployments", NS, name)
        assert obj is not None
        return int(obj["spec"]["replicas"])

    def ready_pods(self, name: str, count: int) -> None:
        self.api.put(kube_api.deployment(name, NS, replicas=count))
        self.api.run_workloads()
        for pod in self.api.objects("", "pods", NS):
            if pod["metadata"]["labels"].get("app") == name:
                self.api.set_pod_state(NS, pod["metadata"]["name"], node="gpu-a", running=True, ready=True)

    async def settle(self) -> None:
        rv = self.api.resource_version
        await eventually(
            lambda: all(
                int(inf.resource_version or 0) >= rv
                for inf in (self.controller.policies, *self.controller.caches.all)
            ),
            "watches caught up",
        )


@pytest.fixture
async def make_env() -> AsyncIterator[Any]:
    made: list[Env] = []

    async def make(**controller: Any) -> Env:
        clock = clock_mod.FakeClock(start=1_800_000_000.0)
        api = await FakeKubeApi(clock=clock, bookmark_interval_s=0.1).__aenter__()
        env = Env(api, clock, **controller)
        made.append(env)
        return env

    yield make
    for env in made:
        await env.controller.close()
        env.client.close()
        await env.api.__aexit__(None, None, None)


async def test_missing_target_with_failing_status_writes_keeps_the_process_alive(make_env: Any) -> None:
    """Regression: a missing target (common with GitOps) plus one failed status PATCH in that error path
    escaped the per-policy isolation, ended the TaskGroup cycle and exited the process."""
    env = await make_env(interval_s=15.0)
    env.ready_pods("fine", 1)
    env.api.put(kube_api.scaling_policy("ghost", NS))
    env.api.put(kube_api.scaling_policy("fine", NS))
    env.demand.level.update(fine=35.0)
    env.api.inject_error("PATCH", r"/scalingpolicies/ghost/status$", 403, times=1000)
    stop = asyncio.Event()
    task = asyncio.create_task(env.controller.run(stop))
    try:
        await eventually(lambda: env.controller.cycles >= 1, "first cycle")
        assert not task.done()
        assert env.replicas("fine") == 4
        assert env.errors("ghost") == 1
        await advance_until(env.clock, lambda: env.errors("ghost") >= 3, "ghost retried", step_s=1.0)
        assert not task.done()
    finally:
        stop.set()
        await task
    assert task.exception() is None


async def test_a_failing_policy_backs_off_exponentially(make_env: Any) -> None:
    env = await make_env()
    env.api.put(kube_api.scaling_policy("ghost", NS))
    await env.controller.start()
    await env.settle()
    await env.controller.reconcile_all()
    assert env.errors("ghost") == 1
    await env.controller.reconcile_all()  # at once: still waiting out its first delay
    assert env.errors("ghost") == 1
    env.clock.advance(1.0)
    await env.controller.reconcile_all()
    assert env.errors("ghost") == 2
    env.clock.advance(1.0)  # the second delay is 2 s
    await env.controller.reconcile_all()
    assert env.errors("ghost") == 2
    env.clock.advance(1.0)
    await env.controller.reconcile_all()
    assert env.errors("ghost") == 3
    # the target appears: the next due attempt succeeds and forgets the failures
    env.ready_pods("ghost", 1)
    await env.settle()
    env.clock.advance(4.0)
    result = await env.controller.reconcile_all()
    assert (result.reconciled, result.failed) == (1, 0)
    assert env.controller.backoff.failures((NS, "ghost")) == 0


async def test_a_429_retry_after_delays_the_policy_at_least_that_long(make_env: Any) -> None:
    env = await make_env()
    env.ready_pods("chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 45.0
    await env.controller.start()
    await env.settle()
    env.api.inject_error("PUT", r"/deployments/chat/scale$", 429, times=1, retry_after_s=60)
    result = await env.controller.reconcile_all()
    assert result.failed == 1 and env.replicas("chat") == 2
    assert len(env.api.calls("update", "deployments", "scale")) == 1  # not retried on the worker thread
    env.clock.advance(59.0)
    assert not env.controller.backoff.ready((NS, "chat"))
    env.clock.advance(1.0)
    assert env.controller.backoff.ready((NS, "chat"))
    await env.controller.reconcile_all()
    assert env.replicas("chat") == 5


async def test_status_is_written_only_when_it_changes_meaningfully(make_env: Any) -> None:
    """Regression: demand and forecast figures moved every cycle, so status was patched every cycle."""
    env = await make_env()
    env.ready_pods("chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.demand.level["chat"] = 20.0
    await env.controller.start()
    await env.settle()

    def status_writes() -> int:
        return len(env.api.calls("patch", "scalingpolicies", "status"))

    await env.controller.reconcile_all()
    assert status_writes() == 1
    for level in (18.0, 19.5, 16.0):  # same replicas, same conditions: figures only
        env.demand.level["chat"] = level
        env.clock.advance(15.0)
        await env.controller.reconcile_all()
    assert status_writes() == 1
    env.demand.level["chat"] = 60.0  # a new desired replica count is worth a write
    env.clock.advance(15.0)
    await env.controller.reconcile_all()
    assert status_writes() == 2
    env.clock.advance(reporting.STATUS_REFRESH_S)  # and the figures are refreshed every 5 minutes
    await env.controller.reconcile_all()
    assert status_writes() == 3


class CrashOnce(lease.LeaseElector):
    """An elector whose first run raises, as a bug or an unexpected error would."""

    runs = 0

    async def run(self, stop: asyncio.Event, on_change: Any = None) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("a bug in the elector")
        await super().run(stop, on_change)


async def test_a_crashed_elector_is_restarted(make_env: Any) -> None:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.1) as api:
        client = kube_api_mod.client_for(api.url)
        elector = CrashOnce(
            client, name="forestall-controller", namespace=NS, identity="a", clock=clock, **LEASE
        )
        controller = loop.Controller(
            client,
            demand=(level := Level()),
            forecasts=level.forecaster,
            clock=clock,
            controller_metrics=metrics.ControllerMetrics(CollectorRegistry()),
            namespace=NS,
            identity="a",
            elector=elector,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            await advance_until(clock, lambda: elector.is_leader, "leading after a restart", step_s=1.0)
            assert elector.runs == 2 and controller.elector_restarts == 1
            assert controller.liveness_problems() == []
        finally:
            stop.set()
            await task
            client.close()


async def test_sigterm_releases_the_lease_only_after_in_flight_reconciles_finish() -> None:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    entered, proceed = threading.Event(), threading.Event()

    def blocking(*args: Any, **inputs: Any) -> decide.Plan:
        entered.set()
        proceed.wait(30)
        return decide.decide(*args, **inputs)

    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.1) as api:
        api.put(kube_api.deployment("chat", NS, replicas=2))
        api.put(kube_api.scaling_policy("chat", NS))
        client = kube_api_mod.client_for(api.url)
        elector = lease.LeaseElector(
            client, name="forestall-controller", namespace=NS, identity="a", clock=clock, **LEASE
        )
        controller = loop.Controller(
            client,
            demand=(level := Level()),
            forecasts=level.forecaster,
            clock=clock,
            controller_metrics=metrics.ControllerMetrics(CollectorRegistry()),
            namespace=NS,
            identity="a",
            elector=elector,
            decide_fn=blocking,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            await advance_until(clock, entered.is_set, "a reconcile in flight", step_s=1.0)
            stop.set()  # SIGTERM while the reconcile is in flight
            renewals = len(api.calls("update", "leases"))
            await advance_until(
                clock,
                lambda: len(api.calls("update", "leases")) >= renewals + 2,
                "the lease still renewed while the reconcile runs",
                step_s=1.0,
            )
            lease_obj = api.get("coordination.k8s.io", "leases", NS, "forestall-controller")
            assert lease_obj is not None and lease_obj["spec"].get("holderIdentity") == "a"
            assert not task.done()
        finally:
            proceed.set()
            await task
            client.close()
        lease_obj = api.get("coordination.k8s.io", "leases", NS, "forestall-controller")
        assert lease_obj is not None and "holderIdentity" not in lease_obj["spec"]


async def test_health_reports_a_stopped_watch_and_readiness_follows_the_caches(make_env: Any) -> None:
    env = await make_env()
    assert env.controller.readiness_problems() == ["watch caches not filled yet"]
    await env.controller.start()
    assert env.controller.readiness_problems() == []
    assert env.controller.liveness_problems() == []
    await asyncio.to_thread(env.controller.caches.pods.stop)
    assert env.controller.liveness_problems() == ["informer pods: watch thread stopped"]
