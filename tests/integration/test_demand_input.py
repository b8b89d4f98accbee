"""`controller.demand.PolicyDemand`: one policy's demand input read end to end, from a real Prometheus
(backfilled with recorded demand) and real `/signals` servers, into `decide()`; and a policy without
Prometheus whose history is built from the signals it reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from balancer import signals as sig
from controller import cluster, decide, demand, policy
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
    return policy.ScalingPolicySpec.model_validate(
        {
            "scaleTargetRef": {"kind": "Deployment", "name": "worker"},
            "demand": {"balancer": {"service": "balancer"}, **demand_over},
            "capacity": {"streamsPerReplica": 64},
            "replicas": {"min": 1, "max": 40},
            "forecast": {"stepSeconds": 60, "historySeconds": 86400, "model": "seasonalNaive"},
        }
    )


def state(n: int, now: float) -> cluster.ClusterState:
    pods = tuple(cluster.PodState(name=f"w{i}", phase="ready", created_s=now - 7200) for i in range(n))
    return cluster.ClusterState(spec_replicas=n, pods=pods)


async def test_prometheus_and_signals_feed_decide(tmp_path: Path, balancer: Balancer) -> None:
    ts, vs = recorded_demand(26)
    now = float(ts[-1] // 3600 * 3600) + 5
    with running_prometheus(tmp_path, series=per_backend(ts, vs, labels={"namespace": "llm"})) as prom:
        spec = make_spec(prometheus={"url": prom.url, "query": QUERY})
        reader = demand.PolicyDemand(spec)
        balancer.time = now - 1
        balancer.active = {"w0": 300, "w1": 290, "w2": 320}
        async with aiohttp.ClientSession() as session:
            reading = await reader.read(
                now, state=state(3, now), session=session, balancer_replicas=[balancer.address]
            )
        assert reading.errors == ()
        h = reading.history
        assert h is not None and h.forecast is not None and h.timestamps.size == 1440
        assert h.forecast.horizon_s == 480 and h.forecast.computed_s == now
        assert reading.signals is not None and reading.signals.active_streams == 910
        plan = decide.decide(spec, now, h, reading.signals, state(3, now))
        assert plan.demand_data_available
        # 910 streams now need 15 replicas at 64 each; the forecast may ask for more, never fewer.
        assert (
            plan.desired_replicas >= 15 and plan.observed_demand is not None and plan.observed_demand >= 910
        )
        assert reader.for_spec(spec) is reader
        moved = make_spec(prometheus={"url": prom.url, "query": QUERY}, staleAfterSeconds=30)
        assert reader.for_spec(moved) is not reader


async def test_unreachable_prometheus_is_reported_and_decide_holds(balancer: Balancer) -> None:
    from tests.fakes.prometheus import free_port

    now = 1_700_000_000.0
    spec = make_spec(prometheus={"url": f"http://127.0.0.1:{free_port()}", "query": QUERY})
    reader = demand.PolicyDemand(spec)
    balancer.time = now
    async with aiohttp.ClientSession() as session:
        reading = await reader.read(
            now, state=state(5, now), session=session, balancer_replicas=[balancer.address]
        )
    assert reading.history is None and reading.signals is not None
    assert len(reading.errors) == 1 and "unreachable" in reading.errors[0]
    plan = decide.decide(spec, now, reading.history, reading.signals, state(5, now))
    assert not plan.demand_data_available and plan.reasons[0].code == "HistoryMissing"
    assert plan.desired_replicas == 5


async def test_a_policy_without_prometheus_builds_its_history_from_signals(balancer: Balancer) -> None:
    spec = make_spec()
    reader = demand.PolicyDemand(spec)
    now = 1_700_000_000.0 - 1_700_000_000.0 % 60
    async with aiohttp.ClientSession() as session:
        balancer.time, balancer.active = now, {"w0": 100}
        first = await reader.read(
            now, state=state(2, now), session=session, balancer_replicas=[balancer.address]
        )
        assert first.history is not None and first.history.forecast is None
        assert any("only 1 demand samples" in e for e in first.errors)
        plan = decide.decide(spec, now, first.history, first.signals, state(2, now))
        assert plan.reasons[0].code == "ForecastMissing" and plan.desired_replicas == 2
        for k in range(1, 4):
            t = now + 60 * k
            balancer.time, balancer.active = t, {"w0": 100 + 10 * k}
            reading = await reader.read(
                t, state=state(2, t), session=session, balancer_replicas=[balancer.address]
            )
        assert reading.errors == ()
        h = reading.history
        assert h is not None and h.values.tolist() == [100.0, 110.0, 120.0, 130.0] and h.forecast is not None
        # The balancer goes quiet: the signals-built history stops at its last sample and goes stale.
        late = now + 60 * 3 + 120
        gone = await reader.read(late, state=state(3, late), session=session, balancer_replicas=[])
        plan = decide.decide(spec, late, gone.history, gone.signals, state(3, late))
        assert not plan.demand_data_available and not plan.drain
        assert gone.history is not None and gone.history.forecast is not None
        # Held: never below the 3 there are; the (wide, four-sample) forecast may only raise it.
        assert plan.desired_replicas == max(3, decide.replicas_for(gone.history.forecast.value, 64))
        assert {r.code for r in plan.reasons} >= {"HistoryStale", "SignalsMissing"}
