"""The relay end to end on loopback: SSE and JSON through the balancer, least-loaded placement, leases."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from contract import clock as clock_mod
from contract import signals
from tests.fakes.balancer_env import balancer, completion_body, emulators, fetch_json, read_sse, wait_until

FAST = {"slots": 8, "ttft_s": 0.0, "seconds_per_token": 0.0}


async def test_sse_stream_is_relayed_whole_and_its_lease_returns() -> None:
    async with emulators(FAST) as addrs, balancer(addrs) as lb, aiohttp.ClientSession() as http:
        async with http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=5)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await read_sse(resp)
        assert len(events) == 6 and events[-1] == "[DONE]"
        backend = lb.bal.pool.backends[addrs[0]]
        assert (backend.active, backend.started, backend.completed) == (0, 1, 1)
        assert backend.relayed_bytes > 0 and backend.ttfb_samples == 1


async def test_json_response_and_forwarded_headers() -> None:
    seen: dict[str, str] = {}

    async def capture(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        seen.update(request.headers)
        return aiohttp.web.json_response(
            {"ok": True}, headers={"Connection": "close, X-Secret", "X-Secret": "1"}
        )

    from tests.fakes.balancer_env import scripted_backend

    runner, address = await scripted_backend(capture)
    try:
        async with balancer([address]) as lb, aiohttp.ClientSession() as http:
            headers = {
                "X-Forwarded-For": "10.0.0.1",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "drop me",
                "X-Keep": "1",
            }
            async with http.post(f"{lb.url}/v1/x?q=1", json={"a": 1}, headers=headers) as resp:
                assert resp.status == 200
                assert await resp.json() == {"ok": True}
                assert "X-Secret" not in resp.headers  # named by the backend's Connection header
        assert seen["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["X-Keep"] == "1" and "X-Hop" not in seen
        assert seen["Content-Type"] == "application/json"
    finally:
        await runner.cleanup()


async def test_streams_spread_by_capacity_weight_and_leases_hold_until_the_end() -> None:
    """With streams held open, the weight-2 backend carries twice the streams of each weight-1 backend."""
    fake = clock_mod.FakeClock()
    slow = {"slots": 64, "ttft_s": 0.0, "seconds_per_token": 1000.0}  # first token at once, then parked
    async with (
        emulators(slow, slow, slow, clock=fake) as addrs,
        balancer(addrs, weights={addrs[0]: 2.0}) as lb,
    ):
        async with aiohttp.ClientSession() as http:
            responses = []
            for _ in range(12):
                resp = await http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=3))
                await resp.content.readline()  # the first event: the stream is open
                responses.append(resp)
            assert [lb.active(a) for a in addrs] == [6, 3, 3]
            for resp in responses:
                resp.close()  # client goes away mid-stream
            await wait_until(lambda: lb.active() == 0, what="leases released after client disconnect")
        report = signals.Signals.model_validate(await _signals(lb))
        assert sum(b.active_streams for b in report.backends) == 0


async def test_client_disconnect_while_waiting_for_first_byte_releases_the_lease() -> None:
    """The handler is cancelled when the client leaves before the backend answered; the lease goes with it."""
    fake = clock_mod.FakeClock()
    parked = {"slots": 1, "ttft_s": 1000.0, "seconds_per_token": 0.0}  # never reaches the first token
    async with emulators(parked, clock=fake) as addrs, balancer(addrs) as lb:
        body = json.dumps(completion_body()).encode()
        _reader, writer = await asyncio.open_connection("127.0.0.1", lb.served.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await wait_until(lambda: lb.active() == 1, what="stream placed")
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: lb.active() == 0, what="lease released on cancellation")
        assert lb.bal.pool.backends[addrs[0]].failed.get("cancelled") == 1


async def _signals(lb: object) -> dict[str, object]:
    async with aiohttp.ClientSession() as http:
        return await fetch_json(http, f"{lb.admin_url}/signals")  # type: ignore[attr-defined]


async def test_header_affinity_keeps_a_key_on_one_backend() -> None:
    async with (
        emulators(FAST, FAST, FAST) as addrs,
        balancer(addrs, affinity_header="X-User", session_epsilon=10.0) as lb,
        aiohttp.ClientSession() as http,
    ):
        served: dict[str, set[str]] = {"alice": set(), "bob": set(), "carol": set(), "dave": set()}
        for _ in range(4):
            for user, backends in served.items():
                body = completion_body(stream=False)
                async with http.post(f"{lb.url}/v1/completions", json=body, headers={"X-User": user}) as resp:
                    backends.add((await resp.json())["model"])
        assert all(len(backends) == 1 for backends in served.values())
        assert sum(b.completed for b in lb.bal.pool.backends.values()) == 16
