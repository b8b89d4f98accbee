"""The security review's defects on loopback, one regression test each (the docstring names the finding).

Real sockets throughout: raw asyncio connections for shapes an HTTP client will not send, aiohttp for the rest.
Deadlines that the balancer measures on its injected clock (write, idle) are driven by a FakeClock and an
explicit sweep; the listener's own deadlines (headers, keep-alive, body) run on the loop with small limits, and
the tests wait for their effect (an answer, a close) under a bound, never asserting how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer import responses, runtime
from contract import clock as clock_mod
from tests.fakes.balancer_env import Handler, Running, balancer, scripted_backend, wait_until

SECRET = "s3cret-token-value"


async def _raw(lb: Running, request: bytes, *, read_all: bool = False) -> bytes:
    """Send raw bytes on a fresh connection; the answer's head (or everything until close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.served.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await (reader.read() if read_all else reader.readuntil(b"\r\n\r\n"))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


@contextlib.asynccontextmanager
async def _backend(handler: Handler) -> AsyncIterator[str]:
    runner, address = await scripted_backend(handler)
    try:
        yield address
    finally:
        await runner.cleanup()


async def _ok(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"path": request.raw_path, "headers": dict(request.headers), "body_bytes": len(body)}
    )


async def test_stalled_reader_is_cut_by_the_write_deadline_releases_its_lease_and_is_blamed() -> None:
    """H2: a client that stops reading kept its lease and its max_streams slot until it closed; when it
    resumed, the healthy backend was charged a timeout."""

    async def firehose(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = b"data: " + b"x" * 65536 + b"\n\n"
        with contextlib.suppress(ConnectionError):
            while True:
                await resp.write(chunk)
        return resp

    fake = clock_mod.FakeClock()
    async with (
        _backend(firehose) as address,
        balancer([address], clock=fake, write_timeout_s=30.0, idle_timeout_s=10.0) as lb,
    ):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", lb.served.port))
        _reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read a byte
        backend = lb.bal.pool.backends[address]

        def backed_up() -> bool:
            lease = next(iter(backend.leases), None)
            return lease is not None and lease.client is not None and lease.client.get_write_buffer_size() > 0

        await wait_until(backed_up, what="the balancer's buffer to the client filled up")
        lease = next(iter(backend.leases))
        cut_after_s = 0.0
        while not lease.client_stalled and cut_after_s < 100.0:
            lb.bal.sweep_idle()  # past the 10 s idle limit too: the backend is blocked by us, not idle
            fake.advance(10.0)
            cut_after_s += 10.0
        assert lease.client_stalled and 30.0 <= cut_after_s <= 50.0  # the deadline, within a sweep or two
        await wait_until(lambda: lb.active() == 0, what="the stalled reader's lease was released")
        assert backend.failed == {"client_stalled": 1}
        assert backend.consecutive_failures == 0 and backend.state(fake.monotonic()) == "ready"
        writer.close()


async def test_a_slow_reader_that_keeps_reading_is_not_cut() -> None:
    """The write deadline measures what the client takes, not the buffer's size: the backend refills the buffer
    as fast as a slow client drains it, so its size alone would look like a stall."""

    async def firehose(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await resp.write(b"data: " + b"x" * 65536 + b"\n\n")
        return resp

    fake = clock_mod.FakeClock()
    async with (
        _backend(firehose) as address,
        balancer([address], clock=fake, write_timeout_s=30.0, idle_timeout_s=10.0) as lb,
    ):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", lb.served.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024 * 1024)
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        backend = lb.bal.pool.backends[address]

        def lease() -> Any:
            return next(iter(backend.leases), None)

        await wait_until(
            lambda: (
                lease() is not None
                and lease().client is not None
                and lease().client.get_write_buffer_size() > 0
            ),
            what="the buffer to the client filled up",
        )

        def delivered() -> int:
            return int(lease().delivered_bytes(runtime.queued_to_client(lease().client)))

        for _ in range(6):  # 60 s in all, twice the write deadline, reading a little every 10 s
            taken = delivered()
            await reader.readexactly(256 * 1024)
            await wait_until(lambda: delivered() > taken, what="the balancer saw the client take bytes")  # noqa: B023
            fake.advance(10.0)
            lb.bal.sweep_idle()
            assert lb.active() == 1, "a client that keeps reading was cut"
        assert backend.failed == {}
        writer.close()


async def test_slow_uploads_get_408_and_blame_no_backend() -> None:
    """M1: a slow upload over the retry buffer held a lease, then charged the backend with timeouts until it
    was ejected. Bodies now have their own deadlines; the client gets 408 and the backend is not blamed."""
    async with (
        _backend(_ok) as address,
        balancer([address], body_idle_timeout_s=0.2, retry_buffer_bytes=100, consecutive_failures=1) as lb,
    ):
        backend = lb.bal.pool.backends[address]
        buffered = await _raw(
            lb, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n" + b"x" * 10
        )
        assert _status(buffered) == 408 and backend.started == 0  # no lease while the body trickles
        streamed = await _raw(
            lb, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 300
        )
        assert _status(streamed) == 408
        await wait_until(lambda: lb.active() == 0, what="lease released")
        assert backend.failed == {"client_body": 1}
        assert backend.consecutive_failures == 0 and backend.state(lb.bal.clock.monotonic()) == "ready"


async def test_trickled_headers_are_cut_with_408() -> None:
    """M2: there was no header-read timeout, so trickled headers stayed open indefinitely."""
    async with _backend(_ok) as address, balancer([address], header_timeout_s=0.2) as lb:
        answer = await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ", read_all=True)
        assert _status(answer) == 408 and answer.endswith(b"}" + b" " * 5)
        silent = await _raw(lb, b"", read_all=True)  # a connection that never sends a byte is closed too
        assert silent == b"" or _status(silent) == 408
        assert _status(await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


async def test_connection_caps_per_client_address() -> None:
    """M2: there was no connection cap; a client could hold any number of descriptors."""
    async with _backend(_ok) as address, balancer([address], max_connections_per_ip=2) as lb:
        held = [await asyncio.open_connection("127.0.0.1", lb.served.port) for _ in range(2)]
        server = lb.served.runners[0].server
        assert server is not None
        await wait_until(lambda: getattr(server, "open_total", 0) == 2, what="two connections counted")
        refused = await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", read_all=True)
        assert _status(refused) == 503 and b"Retry-After: 1" in refused
        for _, writer in held:
            writer.close()
        await wait_until(lambda: getattr(server, "open_total", 0) == 0, what="closed connections uncounted")
        assert _status(await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


async def test_idle_keep_alive_connections_are_closed() -> None:
    async with _backend(_ok) as address, balancer([address], keepalive_timeout_s=0.2) as lb:
        answer = await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", read_all=True)
        assert _status(answer) == 200  # read_all returned: the server closed the idle connection


async def test_error_bodies_are_generic_and_logged_details_are_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """M3: 502 bodies echoed repr(exc), including the client's Authorization and Cookie headers and raw
    backend bytes."""

    async def reset(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.write(b"HTTP/1.1 2")  # raw garbage, then the connection dies
        request.transport.abort()
        return web.Response()

    caplog.set_level(logging.INFO)
    async with (
        _backend(reset) as address,
        balancer([address]) as lb,
        aiohttp.ClientSession() as http,
    ):
        headers = {"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}"}
        async with http.post(f"{lb.url}/v1/completions", json={"p": 1}, headers=headers) as resp:
            assert resp.status == 502
            text = await resp.text()
        assert json.loads(text)["error"]["message"] == "the backend failed before answering"
        assert SECRET not in text and address not in text and "HTTP/1.1 2" not in text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert address in logged  # the details went to the log ...
    assert SECRET not in logged  # ... without the credentials


def test_redaction_masks_credentials_in_any_detail() -> None:
    detail = (
        f"headers={{'Authorization': 'Bearer {SECRET}', 'Cookie': 'sid={SECRET}', 'X-Api-Key': '{SECRET}'}} "
        f"url=http://b/v1?token={SECRET}&x=1 proxy-authorization: Basic {SECRET}"
    )
    masked = responses.redact(detail)
    assert SECRET not in masked and "x=1" in masked and "http://b/v1" in masked


async def test_upstream_503_with_nowhere_to_retry_reaches_the_client_with_its_retry_after() -> None:
    """Low: an upstream 503 with nowhere to retry reached the client as 502, without its Retry-After."""
    calls: list[str] = []

    async def busy(request: web.Request) -> web.Response:
        calls.append(request.host)
        await request.read()
        return web.json_response({"error": "overloaded"}, status=503, headers={"Retry-After": "7"})

    async with _backend(busy) as one, _backend(busy) as two:
        async with balancer([one]) as lb, aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", json={}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "7"
                assert (await resp.json()) == {"error": "overloaded"}
        async with balancer([one, two]) as lb, aiohttp.ClientSession() as http:
            calls.clear()
            async with http.post(f"{lb.url}/v1/completions", json={}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "7"
            assert len(calls) == 2  # retried once (a 503 means the backend did not act), then relayed


async def test_only_configured_routes_and_safe_methods_are_proxied() -> None:
    """Low: every path and method was proxied (TRACE, the backend's /metrics)."""
    async with _backend(_ok) as address, balancer([address]) as lb:
        assert _status(await _raw(lb, b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
        assert _status(await _raw(lb, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")) == 404
        assert _status(await _raw(lb, b"GET /v1/../metrics HTTP/1.1\r\nHost: x\r\n\r\n")) == 400
        assert _status(await _raw(lb, b"GET /v1/%2e%2e/metrics HTTP/1.1\r\nHost: x\r\n\r\n")) == 400
        assert _status(await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")) == 200
        assert lb.bal.pool.backends[address].started == 1
    async with _backend(_ok) as address, balancer([address], routes=["/generate"]) as lb:
        assert _status(await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")) == 404
        assert (
            _status(await _raw(lb, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")) == 200
        )


async def test_expect_100_continue_is_answered_by_the_balancer_not_forwarded() -> None:
    """Low: Expect was forwarded, so 100-continue requests timed out."""
    async with _backend(_ok) as address, balancer([address], first_byte_timeout_s=5.0) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.served.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        async with asyncio.timeout(10):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert _status(interim) == 100
            writer.write(b"hello")
            head = await reader.readuntil(b"\r\n\r\n")
            assert _status(head) == 200
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            seen = json.loads(await reader.readexactly(length))
        writer.close()
        assert seen["body_bytes"] == 5 and "Expect" not in seen["headers"]


async def test_absolute_form_target_goes_to_the_backend_in_origin_form() -> None:
    """Low: an absolute-form target got a 500."""
    async with _backend(_ok) as address, balancer([address]) as lb:
        answer = await _raw(
            lb,
            b"GET http://evil.example/v1/models?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            read_all=True,
        )
        assert _status(answer) == 200
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["path"] == "/v1/models?x=1"


async def test_invalid_header_bytes_get_400_and_malformed_requests_log_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Low: invalid header bytes were silently deleted; every malformed request logged a traceback."""
    caplog.set_level(logging.DEBUG)
    async with _backend(_ok) as address, balancer([address]) as lb:
        assert _status(await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: caf\xe9\r\n\r\n")) == 400
        assert _status(await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n")) == 400
        assert _status(await _raw(lb, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")) == 400
        assert _status(await _raw(lb, b"\x16\x03\x01garbage\r\n\r\n")) == 400
        cookie = await _raw(
            lb, b"GET /v1/models HTTP/1.1\r\nCookie: sid=" + SECRET.encode() + b"\x01\r\n\r\n", read_all=True
        )
        assert (
            _status(cookie) == 400 and SECRET.encode() not in cookie
        )  # aiohttp's own answer echoed the line
        assert b'"message": "malformed request"' in cookie
        assert lb.bal.pool.backends[address].started == 0
    assert not [r for r in caplog.records if r.exc_info], "a malformed request logged a traceback"
    assert SECRET not in "\n".join(r.getMessage() for r in caplog.records)


async def test_nan_and_infinite_admin_weights_are_refused(tmp_path: Path) -> None:
    """Low: NaN or Inf admin weights were accepted and made /signals answer 500."""
    token = tmp_path / "token"
    token.write_text("t")
    async with (
        _backend(_ok) as address,
        balancer([address], admin_token_file=token) as lb,
        aiohttp.ClientSession() as http,
    ):
        headers = {"Authorization": "Bearer t", "Content-Type": "application/json"}
        for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
            body = f'{{"address": "{address}", "weight": {literal}}}'
            async with http.post(f"{lb.admin_url}/admin/weights", data=body, headers=headers) as resp:
                assert resp.status == 400, literal
        assert lb.bal.pool.backends[address].weight == 1.0
        async with http.get(f"{lb.admin_url}/signals") as resp:
            assert resp.status == 200


async def test_quiet_mcp_notification_stream_ended_by_the_idle_timeout_is_not_the_backends_fault() -> None:
    """Low: a quiet MCP GET notification stream was charged to the backend when an idle timeout ended it."""

    async def notifications(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": ping\n\n")
        await asyncio.Event().wait()  # nothing to say
        return resp

    fake = clock_mod.FakeClock()
    async with (
        _backend(notifications) as address,
        balancer([address], clock=fake, idle_timeout_s=5.0) as lb,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{lb.url}/mcp", headers={"Accept": "text/event-stream"}) as resp:
            assert await resp.content.readline() == b": ping\n"
            backend = lb.bal.pool.backends[address]
            await wait_until(lambda: all(le.stream for le in backend.leases), what="stream watched")
            fake.advance(6.0)
            assert lb.bal.sweep_idle() == 1
            assert (await resp.content.read()) == b"\n"  # ended cleanly, no error event
        await wait_until(lambda: lb.active() == 0, what="lease released")
        assert backend.failed == {"idle_notifications": 1} and backend.consecutive_failures == 0


async def test_only_the_mcp_paths_404_ends_a_session() -> None:
    """Low: any backend 404 on any path ended an MCP session."""

    async def not_found(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "no such thing"}, status=404)

    async with _backend(not_found) as address, balancer([address]) as lb, aiohttp.ClientSession() as http:
        sealed = lb.bal.seal.seal(address, "backend-session")
        lb.bal.sessions.bind(sealed, lb.bal.pool.backends[address], client="127.0.0.1")
        async with http.get(f"{lb.url}/v1/models/missing", headers={"Mcp-Session-Id": sealed}) as resp:
            assert resp.status == 404
        assert len(lb.bal.sessions) == 1  # a 404 elsewhere says nothing about the session
        async with http.post(f"{lb.url}/mcp", json={}, headers={"Mcp-Session-Id": sealed}) as resp:
            assert resp.status == 404
        assert len(lb.bal.sessions) == 0  # the MCP endpoint's 404 means "session expired"
