"""`controller.demand.balancers.fetch_signals` against real aiohttp servers on loopback: replicas that answer, one that
is slow, one that is down, ones that answer garbage, an error or an old report; merged per backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from contract import signals as sig
from controller import cluster, decide
from controller.demand import balancers
from emulation import processes
from tests.fakes import specs

NOW = 1_700_000_000.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Servers:
    """Loopback aiohttp servers, each serving one `/signals` handler; `release` frees slow handlers."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.release = asyncio.Event()

    async def start(self, handler: Handler) -> str:
        app = web.Application()
        app.router.add_get("/signals", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    async def close(self) -> None:
        self.release.set()
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    yield s
    await s.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def report(replica: str, backends: list[dict[str, object]], **kw: object) -> str:
    body = {"replica": replica, "time": NOW - 2, "backends": backends, **kw}
    return sig.Signals.model_validate(body).model_dump_json()


def answer(text: str, status: int = 200) -> Handler:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=text, status=status, content_type="application/json")

    return handle


def backend(address: str, pod: str, active: int, sessions: int = 0) -> dict[str, object]:
    return {
        "address": address,
        "pod": pod,
        "state": "ready",
        "active_streams": active,
        "open_sessions": sessions,
    }


async def test_merges_good_replicas_and_names_every_bad_one(
    servers: Servers, session: aiohttp.ClientSession
) -> None:
    async def slow(_: web.Request) -> web.Response:
        await servers.release.wait()
        return web.Response(text="{}")

    good = [
        await servers.start(
            answer(report("b-0", [backend("10.0.0.1:8000", "w0", 3, 1), backend("10.0.0.2:8000", "w1", 0)]))
        ),
        await servers.start(
            answer(
                report(
                    "b-1",
                    [backend("10.0.0.1:8000", "w0", 2), backend("10.0.0.2:8000", "w1", 4)],
                    admission_queue=2,
                )
            )
        ),
    ]
    bad = {
        await servers.start(slow): "no answer within 0.5 s",
        f"127.0.0.1:{processes.free_port()}": "unreachable",
        await servers.start(answer("{not json")): "malformed /signals",
        await servers.start(
            answer(json.dumps({"replica": "b-9", "time": NOW, "schema_version": 2}))
        ): "schema_version",
        await servers.start(answer('{"error": "boom"}', status=500)): "HTTP 500",
        await servers.start(
            answer(report("b-7", []).replace(f'"time":{NOW - 2}', f'"time":{NOW - 300}'))
        ): "300 s old",
    }
    replicas = [*good, *bad]
    reading = await balancers.fetch_signals(session, replicas, now=NOW, stale_after_s=60, timeout_s=0.5)
    snap = reading.snapshot
    assert snap is not None and reading.replicas == 8
    assert (
        snap.backends["10.0.0.1:8000"].active_streams == 5
        and snap.backends["10.0.0.1:8000"].open_sessions == 1
    )
    assert snap.backends["10.0.0.2:8000"].active_streams == 4
    assert snap.admission_queue == 2 and snap.active_streams == 9 and snap.time_s == NOW - 2
    assert set(snap.unreachable) == set(bad)
    assert len(reading.errors) == len(bad)
    for replica, why in bad.items():
        assert any(e.startswith(f"balancer {replica}: ") and why in e for e in reading.errors), (
            why,
            reading.errors,
        )

    # decide() takes the partial figures as a floor and will not scale down on them.
    spec = specs.spec(demand={"balancer": {"service": "balancer"}}, max_replicas=10)
    ts = NOW - 60 * np.arange(20, dtype=np.float64)[::-1]
    history = decide.DemandHistory(
        step_s=60,
        timestamps=ts,
        values=np.full(20, 1.0),
        fetched_s=NOW,
    )
    peak = decide.PeakForecast(value=1, quantile=0.95, horizon_s=480, computed_s=NOW)
    pods = tuple(cluster.PodState(name=f"w{i}", phase="ready", created_s=NOW - 999) for i in range(6))
    state = cluster.ClusterState(spec_replicas=6, pods=pods)
    plan = decide.decide(spec, NOW, history=history, forecast=peak, signals=snap, state=state)
    assert plan.reasons[0].code == "SignalsIncomplete" and not plan.demand_data_available
    assert plan.desired_replicas == 6 and not plan.drain and plan.observed_demand == 11


async def test_replicas_are_asked_at_the_same_time(servers: Servers, session: aiohttp.ClientSession) -> None:
    """Each replica answers only once the other has been asked: one at a time, both would time out."""
    asked = [asyncio.Event(), asyncio.Event()]

    def waits_for_other(me: int) -> Handler:
        async def handle(_: web.Request) -> web.Response:
            asked[me].set()
            await asked[1 - me].wait()
            return web.Response(text=report(f"b-{me}", [backend(f"10.0.0.{me}:8000", f"w{me}", 1)]))

        return handle

    replicas = [await servers.start(waits_for_other(0)), await servers.start(waits_for_other(1))]
    reading = await balancers.fetch_signals(session, replicas, now=NOW, stale_after_s=60, timeout_s=10)
    assert reading.errors == () and reading.snapshot is not None
    assert reading.snapshot.active_streams == 2 and reading.snapshot.unreachable == ()


async def test_no_usable_replica_gives_no_snapshot(session: aiohttp.ClientSession) -> None:
    down = [f"127.0.0.1:{processes.free_port()}", f"127.0.0.1:{processes.free_port()}"]
    reading = await balancers.fetch_signals(session, down, now=NOW, stale_after_s=60, timeout_s=1)
    assert reading.snapshot is None and len(reading.errors) == 2
    assert all("unreachable" in e for e in reading.errors)
    empty = await balancers.fetch_signals(session, [], now=NOW, stale_after_s=60)
    assert empty.snapshot is None and "no balancer replicas" in empty.errors[0]


async def test_an_oversized_body_is_refused(servers: Servers, session: aiohttp.ClientSession) -> None:
    async def huge(_: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(_)
        chunk = b" " * (1024 * 1024)
        for _i in range(balancers.SIGNALS_MAX_BYTES // len(chunk) + 2):
            await resp.write(chunk)
        return resp

    replica = await servers.start(huge)
    reading = await balancers.fetch_signals(session, [replica], now=NOW, stale_after_s=60, timeout_s=10)
    assert reading.snapshot is None and "larger than" in reading.errors[0]
