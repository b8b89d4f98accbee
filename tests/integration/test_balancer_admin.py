"""Capacity events and reporting on loopback: drain, warm-up via file reload, admission queue, signals, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from contract import clock as clock_mod
from contract import signals
from tests.fakes.balancer_env import (
    balancer,
    completion_body,
    emulators,
    fetch_json,
    read_sse,
    wait_until,
    write_backends,
)

PARKED = {"slots": 64, "ttft_s": 0.0, "seconds_per_token": 1000.0}
"""First token at once, then the stream stays open until the fake clock moves."""

METRIC_NAMES = {
    "forestall_balancer_active_streams",
    "forestall_balancer_queued_streams",
    "forestall_balancer_open_sessions",
    "forestall_balancer_streams_started",
    "forestall_balancer_streams_completed",
    "forestall_balancer_streams_failed",
    "forestall_balancer_ttfb_seconds",
    "forestall_balancer_backend_state",
    "forestall_balancer_hotspot_score",
    "forestall_balancer_admission_queue_length",
    "forestall_balancer_rejected_streams",
    "forestall_balancer_relayed_bytes",
}


async def test_drain_moves_new_streams_away_and_reports_what_remains(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    fake = clock_mod.FakeClock()
    async with (
        emulators(PARKED, PARKED, clock=fake) as addrs,
        balancer(addrs, clock=fake, admin_token_file=token) as lb,
        aiohttp.ClientSession() as http,
    ):
        first = await http.post(f"{lb.url}/v1/completions", json=completion_body())
        await first.content.readline()
        busy = next(a for a in addrs if lb.active(a) == 1)
        other = next(a for a in addrs if a != busy)

        async with http.post(f"{lb.admin_url}/admin/drain", json={"address": busy}) as resp:
            assert resp.status == 401  # no token
        auth = {"Authorization": "Bearer s3cret"}
        async with http.post(f"{lb.admin_url}/admin/drain", json={"address": busy}, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
        fake.advance(7.0)

        for _ in range(3):  # the drained backend is idle-er but gets nothing new
            resp = await http.post(f"{lb.url}/v1/completions", json=completion_body())
            await resp.content.readline()
            resp.close()
        assert lb.bal.pool.backends[busy].started == 1
        report = signals.Signals.model_validate(await fetch_json(http, f"{lb.admin_url}/signals"))
        drained = next(b for b in report.backends if b.address == busy)
        assert (drained.state, drained.active_streams, drained.draining_oldest_s) == ("draining", 1, 7.0)
        assert next(b for b in report.backends if b.address == other).state == "ready"
        first.close()
        await wait_until(lambda: lb.active() == 0, what="all streams ended")
        report = signals.Signals.model_validate(await fetch_json(http, f"{lb.admin_url}/signals"))
        assert next(b for b in report.backends if b.address == busy).draining_oldest_s is None


async def test_admin_changes_are_refused_without_a_token_file() -> None:
    async with emulators(PARKED) as addrs, balancer(addrs) as lb, aiohttp.ClientSession() as http:
        async with http.post(f"{lb.admin_url}/admin/drain", json={"address": addrs[0]}) as resp:
            assert resp.status == 403
            assert "admin-token-file" in (await resp.json())["error"]["message"]
        assert not lb.bal.pool.backends[addrs[0]].draining


async def test_backends_file_reload_adds_a_warming_backend_and_drops_a_removed_one(tmp_path: Path) -> None:
    fake = clock_mod.FakeClock()
    path = tmp_path / "backends.yaml"
    async with emulators(PARKED, PARKED, clock=fake) as addrs:
        write_backends(path, [{"address": addrs[0]}])
        async with (
            balancer(clock=fake, backends_file=path, slow_start_s=60.0) as lb,
            aiohttp.ClientSession() as http,
        ):
            assert lb.bal.pool.backends[addrs[0]].state(fake.monotonic()) == "ready"  # present at startup
            write_backends(path, [{"address": addrs[0]}, {"address": addrs[1], "weight": 2.0}])
            fake.advance(1.0)  # the reload interval
            await wait_until(lambda: addrs[1] in lb.bal.pool.backends, what="reloaded")
            joined = lb.bal.pool.backends[addrs[1]]
            assert (joined.state(fake.monotonic()), joined.weight) == ("warming", 2.0)
            assert lb.bal.warmup.factor(joined) == 0.1  # starts with a tenth of its weight
            fake.advance(30.0)
            assert lb.bal.warmup.factor(joined) == 0.5
            fake.advance(30.0)
            lb.bal.warmup.refresh()
            assert joined.state(fake.monotonic()) == "ready"  # the ramp time bounds the warm-up

            write_backends(path, [{"address": addrs[0]}, {"address": addrs[1], "weight": 2.0, "drain": True}])
            fake.advance(1.0)
            await wait_until(lambda: joined.draining, what="drain mark applied")
            write_backends(path, [{"address": addrs[1]}])  # addrs[0] leaves
            fake.advance(1.0)
            await wait_until(lambda: addrs[0] not in lb.bal.pool.backends, what="removed")

            path.write_text("backends: [{address: nonsense}]")
            fake.advance(1.0)
            await wait_until(
                lambda: lb.bal.pool.backends[addrs[1]] and _reload_error(lb), what="bad file seen"
            )
            assert list(lb.bal.pool.backends) == [addrs[1]]  # the last good set stays
            async with http.get(f"{lb.admin_url}/readyz") as resp:
                assert resp.status == 200


def _reload_error(lb: object) -> bool:
    from balancer import app as app_mod

    admin = lb.served.runners[0].app  # type: ignore[attr-defined]
    return admin[app_mod.FILE_SOURCE].last_error is not None


async def test_admission_queue_waits_then_admits_or_rejects_with_retry_after() -> None:
    fake = clock_mod.FakeClock()
    async with (
        emulators(PARKED, clock=fake) as addrs,
        balancer(
            addrs, clock=fake, max_streams_per_backend=1, admission_queue_max=1, admission_wait_s=5.0
        ) as lb,
        aiohttp.ClientSession() as http,
    ):
        holder = await http.post(f"{lb.url}/v1/completions", json=completion_body())
        await holder.content.readline()
        waiting = asyncio.create_task(http.post(f"{lb.url}/v1/completions", json=completion_body()))
        await wait_until(lambda: len(lb.bal.admission) == 1, what="second stream queued")
        async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as rejected:
            assert rejected.status == 503  # queue full
            assert rejected.headers["Retry-After"] == "5"
        assert _metric(await _scrape(http, lb.admin_url), "forestall_balancer_admission_queue_length") == 1
        holder.close()  # capacity frees up: the queued stream goes through
        resp = await waiting
        assert resp.status == 200, await resp.text()
        resp.close()
        await wait_until(lambda: lb.active() == 0, what="done")

        holder = await http.post(f"{lb.url}/v1/completions", json=completion_body())
        await holder.content.readline()
        timed_out = asyncio.create_task(http.post(f"{lb.url}/v1/completions", json=completion_body()))
        await wait_until(lambda: len(lb.bal.admission) == 1, what="queued again")
        fake.advance(5.0)
        resp = await timed_out
        assert resp.status == 503 and "within 5s" in (await resp.json())["error"]["message"]
        resp.close()
        holder.close()
        assert lb.bal.admission.rejected_total == 2


async def test_metrics_expose_every_contract_name_and_agree_with_signals() -> None:
    async with (
        emulators({"slots": 4, "ttft_s": 0.0, "seconds_per_token": 0.0}) as addrs,
        balancer(addrs) as lb,
    ):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                await read_sse(resp)
            text = await _scrape(http, lb.admin_url)
            names = {family.name for family in text_string_to_metric_families(text)}
            assert METRIC_NAMES <= names
            assert _metric(text, "forestall_balancer_streams_started_total", backend=addrs[0]) == 1
            assert _metric(text, "forestall_balancer_streams_completed_total", backend=addrs[0]) == 1
            assert _metric(text, "forestall_balancer_ttfb_seconds_count", backend=addrs[0]) == 1
            assert _metric(text, "forestall_balancer_backend_state", backend=addrs[0], state="ready") == 1
            assert _metric(text, "forestall_balancer_relayed_bytes_total", backend=addrs[0]) > 0
            report = signals.Signals.model_validate(await fetch_json(http, f"{lb.admin_url}/signals"))
            assert report.backends[0].ttfb_s is not None and report.active_streams == 0
            async with http.get(f"{lb.admin_url}/healthz") as resp:
                assert resp.status == 200


async def _scrape(http: aiohttp.ClientSession, admin_url: str) -> str:
    async with http.get(f"{admin_url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name}{labels} not in the metrics")
