"""Malformed requests get a 4xx (JSON body where the balancer answers) while other streams carry on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from contract import clock as clock_mod
from tests.fakes.balancer_env import (
    Running,
    balancer,
    completion_body,
    emulators,
    read_sse,
    scripted_backend,
    wait_until,
)


async def _raw(lb: Running, request: bytes) -> bytes:
    """Send raw bytes on a fresh connection; return the status line and headers of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.served.port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


@contextlib.asynccontextmanager
async def _with_open_stream(
    **settings: object,
) -> AsyncIterator[tuple[Running, aiohttp.ClientResponse, clock_mod.FakeClock]]:
    fake = clock_mod.FakeClock()
    paced = {"slots": 4, "ttft_s": 0.0, "seconds_per_token": 1.0}
    async with emulators(paced, clock=fake) as addrs, balancer(addrs, **settings) as lb:  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as http:
            stream = await http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=3))
            await stream.content.readline()
            yield lb, stream, fake
            for _ in range(10):
                fake.advance(1.0)
                await asyncio.sleep(0.01)
            events = await read_sse(stream)
            stream.close()
            assert events[-1] == "[DONE]", "the open stream finished despite the malformed requests"
        await wait_until(lambda: lb.active() == 0, what="leases released")


async def test_malformed_requests_get_4xx_while_a_stream_continues() -> None:
    async with _with_open_stream(max_body_bytes=1000) as (lb, _stream, _fake):
        bad_header = await _raw(lb, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert _status(bad_header) == 400
        too_big = await _raw(lb, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        assert _status(too_big) == 413
        chunked_too_big = await _raw(
            lb,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"3e8\r\n" + b"x" * 1000 + b"\r\n") * 2
            + b"0\r\n\r\n",
        )
        assert _status(chunked_too_big) == 413
        broken_chunks = await _raw(
            lb,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        )
        assert _status(broken_chunks) == 400
        bad_upgrade = await _raw(
            lb, b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert _status(bad_upgrade) == 400
        assert lb.active() == 1  # only the healthy stream holds a lease


async def test_oversized_body_answer_is_json() -> None:
    async with _with_open_stream(max_body_bytes=200) as (lb, _stream, _fake):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", data=b"x" * 1000) as resp:
                assert resp.status == 413
                assert "exceeds the limit" in (await resp.json())["error"]["message"]


async def test_large_bodies_stream_through_and_over_limit_chunked_uploads_get_413() -> None:
    """Bodies larger than the retry buffer are streamed to the backend as they arrive, still under the limit."""
    received: list[int] = []

    async def count_body(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.json_response({"ok": True})

    runner, address = await scripted_backend(count_body)

    async def chunks(total: int) -> AsyncIterator[bytes]:
        for _ in range(total // 1000):
            yield b"y" * 1000

    try:
        async with balancer([address], retry_buffer_bytes=2000, max_body_bytes=50_000) as lb:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{lb.url}/v1/upload", data=chunks(40_000)) as resp:
                    assert resp.status == 200
                async with http.post(f"{lb.url}/v1/upload", data=chunks(80_000)) as resp:
                    assert resp.status == 413
                    assert "exceeds the limit" in (await resp.json())["error"]["message"]
            assert received[0] == 40_000
            assert lb.bal.pool.backends[address].failed == {}  # the client's fault, not the backend's
            assert lb.active() == 0
    finally:
        await runner.cleanup()
