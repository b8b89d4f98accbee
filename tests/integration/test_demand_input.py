"""`controller.demand.registry.PolicyDemand`: one policy's demand input read end to end, from a real Prometheus
(backfilled with recorded demand) and real `/signals` servers, through the reconcile pipeline (forecast,
`decide()`, dry-run) against a fake cluster; and a policy without Prometheus whose history is built from the
signals it reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from contract import clock as clock_mod
from contract import signals as sig
from controller import cluster, decide, pipeline, policy
from controller.demand import registry
from emulation import processes
from tests.fakes import specs
from tests.fakes.cluster import FakeCluster
from tests.fakes.prometheus import per_backend, recorded_demand, running_prometheus

QUERY = 'sum(forestall_balancer_active_streams{namespace="llm"})'


class Balancer:
    """A loopback server standing in for a balancer replica's `/signals`, with figures the test sets."""

    def __init__(self) -> None:
        self.time = 0.0
        self.active = {"w0": 0}
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/signals", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"

    async def handle(self, _: web.Request) -> web.Response:
        backends = [
            sig.BackendSignals(address=f"10.0.0.{i}:8000", pod=pod, state="ready", active_streams=n)
            for i, (pod, n) in enumerate(self.active.items())
        ]
        body = sig.Signals(replica="b-0", time=self.time, backends=backends).model_dump_json()
        return web.Response(text=body, content_type="application/json")


@pytest.fixture
async def balancer() -> AsyncIterator[Balancer]:
    b = Balancer()
    await b.start()
    yield b
    assert b.runner is not None
    await b.runner.cleanup()


def make_spec(**demand_over: object) -> policy.ScalingPolicySpec:
    return specs.spec(
        demand={"balancer": {"service": "balancer"}, **demand_over},
        streams_per_replica=64,
        min_replicas=1,
        max_replicas=40,
        forecast={"stepSeconds": 60, "historySeconds": 86400, "model": "seasonalNaive"},
    )


def state(n: int, now: float) -> cluster.ClusterState:
    pods = tuple(cluster.PodState(name=f"w{i}", phase="ready", created_s=now - 7200) for i in range(n))
    return cluster.ClusterState(spec_replicas=n, pods=pods)


class OnePolicy:
    """A `PolicyDemand` behind the pipeline's `DemandSource` seam, with the session and replicas it asks."""

    def __init__(
        self, reader: registry.PolicyDemand, session: aiohttp.ClientSession | None, replicas: list[str]
    ) -> None:
        self.reader, self.session, self.replicas = reader, session, replicas

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        return await self.reader.read(now, session=self.session, balancer_replicas=self.replicas)


class Outcomes:
    """The pipeline's reporter in these tests: the last outcome."""

    last: pipeline.Outcome | None = None

    def report(self, outcome: pipeline.Outcome) -> None:
        self.last = outcome


def dry_pipeline(
    spec: policy.ScalingPolicySpec, source: OnePolicy, fake: FakeCluster, clock: clock_mod.FakeClock
) -> pipeline.PolicyPipeline:
    """The product's reconcile pipeline for `spec`, dry-run (the fake cluster keeps the state it was given)."""
    scaling_policy = policy.ScalingPolicy(metadata=policy.ObjectMeta(name="chat", namespace="llm"), spec=spec)
    return pipeline.PolicyPipeline(
        scaling_policy, cluster=fake, demand=source, reporter=Outcomes(), clock=clock, dry_run=True
    )


async def test_prometheus_and_signals_feed_decide(tmp_path: Path, balancer: Balancer) -> None:
    ts, vs = recorded_demand(26)
    now = float(ts[-1] // 3600 * 3600) + 5
    with running_prometheus(tmp_path, series=per_backend(ts, vs, labels={"namespace": "llm"})) as prom:
        spec = make_spec(prometheus={"url": prom.url, "query": QUERY})
        reader = registry.PolicyDemand(spec)
        balancer.time = now - 1
        balancer.active = {"w0": 300, "w1": 290, "w2": 320}
        async with aiohttp.ClientSession() as session:
            source = OnePolicy(reader, session, [balancer.address])
            pipe = dry_pipeline(spec, source, FakeCluster(state(3, now)), clock_mod.FakeClock(start=now))
            outcome = await pipe.reconcile()
        assert outcome.demand_errors == ()
        plan = outcome.plan
        fc = plan.forecast
        assert fc is not None and fc.horizon_s == 480 and fc.computed_s == now
        assert plan.observed_demand == 910 and plan.demand_data_available
        # 910 streams now need 15 replicas at 64 each; the forecast may ask for more, never fewer.
        assert (
            plan.desired_replicas >= 15 and plan.observed_demand is not None and plan.observed_demand >= 910
        )
        assert reader.prometheus_ is not None and reader.prometheus_.timestamps_.size == 1440
        assert reader.for_spec(spec) is reader
        moved = make_spec(prometheus={"url": prom.url, "query": QUERY}, staleAfterSeconds=30)
        assert reader.for_spec(moved) is not reader


async def test_unreachable_prometheus_is_reported_and_decide_holds(balancer: Balancer) -> None:

    now = 1_700_000_000.0
    spec = make_spec(prometheus={"url": f"http://127.0.0.1:{processes.free_port()}", "query": QUERY})
    reader = registry.PolicyDemand(spec)
    balancer.time = now
    async with aiohttp.ClientSession() as session:
        reading = await reader.read(now, session=session, balancer_replicas=[balancer.address])
        assert reading.history is None and reading.signals is not None
        assert len(reading.errors) == 1 and "unreachable" in reading.errors[0]
        source = OnePolicy(reader, session, [balancer.address])
        pipe = dry_pipeline(spec, source, FakeCluster(state(5, now)), clock_mod.FakeClock(start=now))
        plan = (await pipe.reconcile()).plan
    assert not plan.demand_data_available and plan.reasons[0].code == "HistoryMissing"
    assert plan.desired_replicas == 5


async def test_a_policy_without_prometheus_builds_its_history_from_signals(balancer: Balancer) -> None:
    spec = make_spec()
    reader = registry.PolicyDemand(spec)
    now = 1_700_000_000.0 - 1_700_000_000.0 % 60
    clock = clock_mod.FakeClock(start=now)
    fake = FakeCluster(state(2, now))
    async with aiohttp.ClientSession() as session:
        source = OnePolicy(reader, session, [balancer.address])
        pipe = dry_pipeline(spec, source, fake, clock)
        balancer.time, balancer.active = now, {"w0": 100}
        first = await pipe.reconcile()
        assert first.plan.forecast is None
        assert any("only 1 demand samples" in e for e in first.demand_errors)
        plan = first.plan
        assert plan.reasons[0].code == "ForecastMissing" and plan.desired_replicas == 2
        for k in range(1, 4):
            clock.advance(60)
            balancer.time, balancer.active = now + 60 * k, {"w0": 100 + 10 * k}
            outcome = await pipe.reconcile()
        assert outcome.demand_errors == ()
        h = reader.signals_history_.history()
        assert h is not None and h.values.tolist() == [100.0, 110.0, 120.0, 130.0]
        assert outcome.plan.forecast is not None
        # The balancer goes quiet: the signals-built history stops at its last sample and goes stale.
        clock.advance(120)
        fake.current = state(3, clock.now())
        source.replicas = []
        gone = await pipe.reconcile()
        plan = gone.plan
        assert not plan.demand_data_available and not plan.drain
        peak = pipe.forecast_.last_
        assert peak is not None
        # Held: never below the 3 there are; the (wide, four-sample) forecast may only raise it.
        assert plan.desired_replicas == max(3, decide.replicas_for(peak.value, 64))
        assert {r.code for r in plan.reasons} >= {"HistoryStale", "SignalsMissing"}


def scaling_policy(port: int, prometheus_url: str | None = None) -> policy.ScalingPolicy:
    demand_spec: dict[str, object] = {"balancer": {"service": "balancer", "port": port}}
    if prometheus_url is not None:
        demand_spec["prometheus"] = {"url": prometheus_url, "query": QUERY}
    return policy.ScalingPolicy.model_validate(
        {
            "metadata": {"name": "chat", "namespace": "llm"},
            "spec": make_spec(**demand_spec).model_dump(by_alias=True, exclude_none=True),
        }
    )


async def test_demands_is_the_loops_demand_source(balancer: Balancer) -> None:
    asked: list[tuple[str, str]] = []

    def endpoints(namespace: str, service: str) -> list[str]:
        asked.append((namespace, service))
        return ["127.0.0.1"]

    source = registry.Demands(balancer_endpoints=endpoints)
    _: pipeline.DemandSource = source
    port = int(balancer.address.rsplit(":", 1)[1])
    obj = scaling_policy(port)
    now = 1_700_000_000.0 - 1_700_000_000.0 % 60
    try:
        balancer.time, balancer.active = now, {"w0": 70, "w1": 60}
        reading = await source.read(obj, now=now)
        history, signals = reading.history, reading.signals
        assert asked == [("llm", "balancer")]
        assert signals is not None and signals.active_streams == 130
        assert history is not None and history.values.tolist() == [130.0]
        assert source.errors("llm", "chat") == reading.errors == ()
        # The same policy again reuses its caches: the history grows.
        balancer.time = now + 60
        history = (await source.read(obj, now=now + 60)).history
        assert history is not None and history.values.size == 2
    finally:
        await source.close()


async def test_demands_reports_endpoint_lookup_failures() -> None:
    def broken(namespace: str, service: str) -> list[str]:
        raise RuntimeError("EndpointSlice watch not synced")

    for source, why in (
        (
            registry.Demands(balancer_endpoints=broken),
            "endpoints unavailable: EndpointSlice watch not synced",
        ),
        (registry.Demands(), "no EndpointSlice lookup configured"),
    ):
        try:
            reading = await source.read(scaling_policy(8081), now=1_700_000_000.0)
            assert reading.history is None and reading.signals is None
            assert any(why in e for e in source.errors("llm", "chat")), source.errors("llm", "chat")
        finally:
            await source.close()
