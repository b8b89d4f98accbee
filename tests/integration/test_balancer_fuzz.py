"""Fuzzing the client listener: random request lines, headers and bodies, plus the shapes the security review
used (absolute-form targets, dot segments, TRACE, Expect, bad chunking, WebSocket upgrades, forged MCP
session ids, header bytes HTTP forbids), never yield a 500, a crash, a leaked lease or a leaked descriptor.

The balancer and a plain backend run on their own event loop in a thread (uvloop's when installed, as
the console script runs), so hypothesis drives blocking
sockets example by example against one long-lived balancer (the state that could leak accumulates). Short
header and body deadlines make incomplete requests end quickly; every example waits, under a bound, for its
connection's lease to be released, and the test ends by checking the descriptor count came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fakes.balancer_env import Running, balancer, scripted_backend

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"BREW"]
TARGETS = [
    b"/v1/completions",
    b"/v1/models?x=1",
    b"/mcp",
    b"/metrics",
    b"/",
    b"*",
    b"http://evil.example/v1/models",
    b"/v1/../metrics",
    b"/v1/%2e%2e/metrics",
    b"//v1/models",
    b"/v1/" + b"a" * 3000,
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 junk", b""]
HEADER_NAMES = [
    b"Content-Length",
    b"Transfer-Encoding",
    b"Expect",
    b"Connection",
    b"Upgrade",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"Mcp-Session-Id",
    b"Mcp-Method",
    b"Mcp-Name",
    b"Host",
    b"Authorization",
    b"Cookie",
    b"X-Forwarded-For",
    b"Bad Name",
]
HEADER_VALUES = [
    b"0",
    b"5",
    b"-1",
    b"99999999999999999999",
    b"chunked",
    b"gzip, chunked",
    b"100-continue",
    b"upgrade",
    b"websocket",
    b"dGhlIHNhbXBsZSBub25jZQ==",
    b"13",
    b"tools/call",
    b"initialize",
    b"AQID",
    b"close",
    b"keep-alive",
    b"caf\xe9",
    b"a\x01b",
    b"Bearer x",
]
SHAPES = [
    (b"GET", b"http://evil.example/v1/models?x=1", b"HTTP/1.1", [(b"Host", b"x")], b"", False, None),
    (b"GET", b"/v1/models", b"HTTP/1.1", [(b"Host", b"x")], b"", False, 20),
    (b"TRACE", b"/v1/models", b"HTTP/1.1", [(b"Host", b"x")], b"", False, None),
    (b"GET", b"/v1/../metrics", b"HTTP/1.1", [(b"Host", b"x")], b"", False, None),
    (b"POST", b"/v1/completions", b"HTTP/1.1", [(b"Expect", b"100-continue"), (b"Content-Length", b"5")], b"hello",
     False, None),
    (b"POST", b"/v1/completions", b"HTTP/1.1", [(b"Transfer-Encoding", b"chunked")], b"zz\r\nhello\r\n0\r\n\r\n",
     False, None),
    (b"POST", b"/v1/completions", b"HTTP/1.1", [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
     b"0\r\n\r\n", False, None),
    (b"GET", b"/v1/realtime", b"HTTP/1.1", [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")], b"", False,
     None),
    (b"POST", b"/mcp", b"HTTP/1.1", [(b"Mcp-Session-Id", b"AQID"), (b"Content-Length", b"2")], b"{}", False, None),
    (b"POST", b"/mcp", b"HTTP/1.1", [(b"Mcp-Method", b"tools/call"), (b"Mcp-Name", b"caf\xe9")], b"", False, None),
    (b"GET", b"/v1/models", b"HTTP/1.1", [(b"X-Bad", b"caf\xe9")], b"", False, None),
    (b"POST", b"/v1/completions", b"HTTP/1.1", [(b"Content-Length", b"1000")], b"x" * 300, True, None),
    (b"POST", b"/v1/completions", b"HTTP/1.1", [(b"Content-Length", b"1000")], b"x" * 300, False, None),
    (b"POST", b"/v1/completions", b"HTTP/1.1", [(b"Content-Length", b"99999999999999999999")], b"", False, None),
]  # fmt: skip
"""The security review's shapes, always tried (explicit examples) besides the random ones."""
MAX_EXAMPLES = 200
"""Enough to cover the shapes above in combination; bounded so the test takes tens of seconds."""
SOCKET_TIMEOUT_S = 10.0
"""An answer (or a close) must come well within this: the listener's deadlines below are sub-second."""

header = st.tuples(
    st.sampled_from(HEADER_NAMES) | st.binary(min_size=1, max_size=12),
    st.sampled_from(HEADER_VALUES) | st.binary(max_size=24),
)
chunked_body = st.lists(
    st.tuples(
        st.sampled_from([b"3", b"zz", b"ffffffffffff", b"0", b"-1", b"3;ext=1"]), st.binary(max_size=5)
    ),
    max_size=4,
).map(lambda parts: b"".join(size + b"\r\n" + data + b"\r\n" for size, data in parts) + b"0\r\n\r\n")
requests = st.tuples(
    st.sampled_from(METHODS) | st.binary(max_size=8),
    st.sampled_from(TARGETS) | st.binary(max_size=24),
    st.sampled_from(VERSIONS),
    st.lists(header, max_size=6),
    st.binary(max_size=1500) | chunked_body,
    st.booleans(),
    st.none() | st.integers(min_value=0, max_value=120),
)
"""(method, target, version, headers, body, half_close, cut): `cut` truncates the request there (a client that
stops mid-head or mid-body and waits)."""


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed, as `forestall balancer` runs (its transports differ from asyncio's)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class _Lab:
    """The balancer and its backend, served on an event loop in a thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.lb: Running | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
            self.ready.set()

    async def _main(self) -> None:
        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"bytes": len(await request.read())})

        runner, address = await scripted_backend(ok)
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with balancer(
                [address],
                header_timeout_s=0.5,
                body_idle_timeout_s=0.3,
                body_timeout_s=2.0,
                first_byte_timeout_s=2.0,
                retry_buffer_bytes=256,
                max_body_bytes=1024,
            ) as lb:
                self.lb = lb
                self.ready.set()
                await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def lab() -> Iterator[_Lab]:
    lab = _Lab()
    lab.thread.start()
    assert lab.ready.wait(timeout=30) and not lab.errors, lab.errors
    yield lab
    lab.stop()


class _ServerErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait(condition: object, *, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _exchange(port: int, raw: bytes, *, half_close: bool) -> bytes:
    """Send `raw`, optionally close our sending side, and read the first answer's head (or to the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(ConnectionError):
            while b"\r\n\r\n" not in answer:
                piece = sock.recv(65536)
                if not piece:
                    break
                answer += piece
        return answer


def _status(answer: bytes) -> int | None:
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) >= 2 and answer.startswith(b"HTTP/") and parts[1].isdigit() else None


@pytest.mark.timeout(600)
def test_the_client_listener_survives_fuzzing(lab: _Lab) -> None:
    assert lab.lb is not None
    lb = lab.lb
    errors = _ServerErrors()
    for name in ("aiohttp.server", "aiohttp.web", "balancer", "asyncio"):
        logging.getLogger(name).addHandler(errors)
    fds_before = _open_fds()
    try:
        _fuzz(lb)
        # Still serving after everything, and nothing left behind.
        assert (
            _status(
                _exchange(lb.served.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", half_close=False)
            )
            == 200
        )
        _wait(lambda: lb.active() == 0, what="every lease released")
        _wait(lambda: _open_fds() <= fds_before + 2, what=f"descriptors back to {fds_before}")
        assert not lab.errors
        assert not errors.records, [r.getMessage() for r in errors.records]
    finally:
        for name in ("aiohttp.server", "aiohttp.web", "balancer", "asyncio"):
            logging.getLogger(name).removeHandler(errors)


def _fuzz(lb: Running) -> None:
    def one(request: tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], bytes, bool, int | None]) -> None:
        method, target, version, headers, body, half_close, cut = request
        line = b" ".join(p for p in (method, target, version) if p)
        head = line + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
        raw = (head + body)[:cut] if cut is not None else head + body
        answer = _exchange(lb.served.port, raw, half_close=half_close)
        status = _status(answer)
        assert status is None or status < 500, (head[:200], answer[:300])
        _wait(lambda: lb.active() == 0, what=f"lease released after {head[:80]!r}")

    for shape in SHAPES:
        one = example(shape)(one)
    fuzzed = settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=True,
    )(given(requests)(one))
    fuzzed()
