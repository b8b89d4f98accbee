"""Failures on loopback: a backend dying mid-stream, refusing, hanging, or hiding errors in 200s."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from contract import clock as clock_mod
from tests.fakes.balancer_env import (
    balancer,
    completion_body,
    emulators,
    read_sse,
    scripted_backend,
    start_app,
    wait_until,
)

FAST = {"slots": 8, "ttft_s": 0.0, "seconds_per_token": 0.0}


async def _dies_mid_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"token": 1}\n\n')
    await resp.write(b'data: {"token": 2}\n\n')
    assert request.transport is not None
    request.transport.abort()  # the process "dies": connection gone, no end of body
    return resp


async def test_backend_dying_mid_stream_ends_the_sse_stream_with_an_error_event() -> None:
    runner, dying = await scripted_backend(_dies_mid_stream)
    try:
        async with balancer([dying]) as lb, aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                assert resp.status == 200
                events = await read_sse(resp)  # ends cleanly: the chunked body is terminated
            assert events[:2] == ['{"token": 1}', '{"token": 2}']
            assert json.loads(events[-1])["error"]["type"] == "upstream_error"
            backend = lb.bal.pool.backends[dying]
            assert backend.active == 0 and backend.failed == {"midstream": 1}
    finally:
        await runner.cleanup()


async def test_other_streams_continue_while_one_backend_dies_mid_stream() -> None:
    runner, dying = await scripted_backend(_dies_mid_stream)
    fake = clock_mod.FakeClock()
    paced = {"slots": 8, "ttft_s": 0.0, "seconds_per_token": 1.0}
    try:
        async with emulators(paced, clock=fake) as addrs, balancer([*addrs, dying]) as lb:
            async with aiohttp.ClientSession() as http:
                # Park a stream on the healthy backend first (least loaded: it has the lower address order).
                lb.bal.pool.backends[dying].draining = True
                healthy = await http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=3))
                await healthy.content.readline()
                lb.bal.pool.backends[dying].draining = False
                lb.bal.pool.backends[addrs[0]].draining = True
                async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as broken:
                    assert json.loads((await read_sse(broken))[-1])["error"]["code"] == 502
                lb.bal.pool.backends[addrs[0]].draining = False
                for _ in range(10):
                    fake.advance(1.0)
                    await asyncio.sleep(0.01)
                events = await read_sse(healthy)
                healthy.close()
                assert events[-1] == "[DONE]"
            await wait_until(lambda: lb.active() == 0, what="all leases released")
    finally:
        await runner.cleanup()


async def test_refused_connections_are_retried_elsewhere_and_eject_the_backend() -> None:
    refusing = await _closed_port()
    async with emulators(FAST) as addrs, balancer([refusing, *addrs], consecutive_failures=2) as lb:
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                async with http.post(f"{lb.url}/v1/completions", json=completion_body(stream=False)) as resp:
                    assert resp.status == 200
                    await resp.read()
        dead = lb.bal.pool.backends[refusing]
        assert dead.failed["connect"] >= 1
        assert dead.state(lb.bal.clock.monotonic()) == "ejected"
        assert lb.bal.pool.backends[addrs[0]].completed == 4
        assert lb.active() == 0


async def test_only_refusing_backends_answer_502_with_a_json_body() -> None:
    refusing = await _closed_port()
    async with balancer([refusing]) as lb, aiohttp.ClientSession() as http:
        async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
            assert resp.status == 502
            assert "cannot connect" in (await resp.json())["error"]["message"]
        assert lb.active() == 0


async def test_hung_backend_times_out_a_get_is_retried_and_a_post_is_not() -> None:
    """M8: a POST that hung after delivery was retried and reached two backends. Now only idempotent
    requests are retried after a timeout; the POST gets 504 and the second backend never sees it."""
    accepted: list[asyncio.StreamWriter] = []
    seen: list[str] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.method)
        await request.read()
        return web.json_response({"ok": True})

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    hung = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    runner, healthy = await scripted_backend(ok)
    try:
        async with (
            balancer([hung, healthy], first_byte_timeout_s=0.2, idle_timeout_s=5.0) as lb,
            aiohttp.ClientSession() as http,
        ):
            async with http.get(f"{lb.url}/v1/models") as resp:
                assert resp.status == 200 and seen == ["GET"]
            assert lb.bal.pool.backends[hung].failed == {"timeout": 1}
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                assert resp.status == 504
                assert (await resp.json())["error"]["message"] == "the backend did not answer in time"
            assert seen == ["GET"]  # the POST reached one backend only
            assert lb.bal.pool.backends[hung].failed == {"timeout": 2}
            assert lb.active() == 0
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
        await runner.cleanup()


async def test_jsonrpc_errors_in_200s_eject_the_backend_for_growing_times() -> None:
    async def jsonrpc_error(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "boom"}})

    runner, failing = await scripted_backend(jsonrpc_error)
    fake = clock_mod.FakeClock()
    try:
        async with (
            emulators(FAST) as addrs,
            balancer([failing, addrs[0]], clock=fake, consecutive_failures=3, base_ejection_s=10.0) as lb,
            aiohttp.ClientSession() as http,
        ):
            bad = lb.bal.pool.backends[failing]

            async def hit_failing_backend() -> None:
                lb.bal.pool.backends[addrs[0]].draining = True
                try:
                    while bad.state(fake.monotonic()) != "ejected":
                        async with http.post(
                            f"{lb.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "x"}
                        ) as r:
                            assert r.status == 200  # the client still gets the backend's answer
                            await r.read()
                finally:
                    lb.bal.pool.backends[addrs[0]].draining = False

            await hit_failing_backend()
            assert bad.failed == {"jsonrpc_error": 3}
            first_until = bad.ejected_until_s
            assert first_until == fake.monotonic() + 10.0
            # While ejected, streams go to the healthy backend.
            async with http.post(f"{lb.url}/v1/completions", json=completion_body(stream=False)) as r:
                assert r.status == 200
            assert lb.bal.pool.backends[addrs[0]].completed == 1
            fake.advance(10.0)
            assert bad.state(fake.monotonic()) == "ready"
            await hit_failing_backend()
            assert bad.ejected_until_s == fake.monotonic() + 20.0  # the second ejection lasts twice as long
    finally:
        await runner.cleanup()


async def test_sse_error_event_counts_as_a_failure() -> None:
    async def sse_error(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"error": {"message": "out of memory", "code": 500}}\n\n')
        await resp.write_eof()
        return resp

    runner, address = await scripted_backend(sse_error)
    try:
        async with balancer([address]) as lb, aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                assert "out of memory" in (await read_sse(resp))[0]
            assert lb.bal.pool.backends[address].failed == {"sse_error": 1}
            assert lb.bal.pool.backends[address].consecutive_failures == 1
    finally:
        await runner.cleanup()


async def test_503_before_the_body_is_retried_on_another_backend() -> None:
    async def overloaded(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"error": "busy"}, status=503)

    runner, busy = await scripted_backend(overloaded)
    try:
        async with emulators(FAST) as addrs, balancer([busy, *addrs]) as lb, aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                    assert resp.status == 200
                    await resp.read()
            assert lb.bal.pool.backends[busy].failed.get("status_503", 0) >= 1
            assert lb.bal.pool.backends[addrs[0]].completed == 3
    finally:
        await runner.cleanup()


async def _closed_port() -> str:
    """An address nothing listens on (bound, then released)."""
    runner, address = await start_app(web.Application())
    await runner.cleanup()
    return address


async def test_idle_backend_mid_stream_is_cut_after_the_idle_timeout() -> None:
    """After the first byte, a backend silent for idle_timeout_s is cut (found by the sweep, no per-chunk timer)."""
    hang = asyncio.Event()

    async def one_event_then_silence(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"token": 1}\n\n')
        await hang.wait()
        return resp

    runner, address = await scripted_backend(one_event_then_silence)
    fake = clock_mod.FakeClock()
    try:
        async with (
            balancer([address], clock=fake, idle_timeout_s=30.0) as lb,
            aiohttp.ClientSession() as http,
        ):
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                assert (await resp.content.readline()).startswith(b"data:")
                await wait_until(
                    lambda: next(iter(lb.bal.pool.backends[address].leases)).stream is not None,
                    what="watched",
                )
                fake.advance(29.0)
                assert lb.bal.sweep_idle() == 0  # not idle long enough yet
                fake.advance(1.5)
                lb.bal.sweep_idle()
                events = await read_sse(resp)
            assert json.loads(events[-1])["error"]["type"] == "upstream_error"
            assert lb.bal.pool.backends[address].failed == {"timeout": 1}
            assert lb.active() == 0
    finally:
        hang.set()
        await runner.cleanup()


async def test_a_retry_waits_in_the_admission_queue_for_a_full_backend() -> None:
    """Retries go through the same placement as first attempts: when the only other backend is at its stream
    cap, the retry queues for its first free slot (it used to give up with 502 at once)."""
    refusing = await _closed_port()
    fake = clock_mod.FakeClock()
    paced = {"slots": 4, "ttft_s": 0.0, "seconds_per_token": 1.0}
    async with (
        emulators(paced, clock=fake) as addrs,
        balancer([refusing, *addrs], max_streams_per_backend=1, admission_wait_s=30.0) as lb,
        aiohttp.ClientSession() as http,
    ):
        lb.bal.pool.backends[refusing].draining = True
        parked = await http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=2))
        await parked.content.readline()
        lb.bal.pool.backends[refusing].draining = False
        retried = asyncio.create_task(http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=1)))
        await wait_until(lambda: len(lb.bal.admission) == 1, what="the retry waits in the admission queue")
        assert lb.bal.pool.backends[refusing].failed == {"connect": 1}
        for _ in range(5):  # the parked stream finishes and frees the slot
            fake.advance(1.0)
            await asyncio.sleep(0.01)
        assert (await read_sse(parked))[-1] == "[DONE]"
        parked.close()
        resp = await retried
        for _ in range(5):
            fake.advance(1.0)
            await asyncio.sleep(0.01)
        assert resp.status == 200 and (await read_sse(resp))[-1] == "[DONE]"
        resp.close()
        await wait_until(lambda: lb.active() == 0, what="leases released")
