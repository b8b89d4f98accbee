"""The body relay at the asyncio-protocol level: backend transport -> client transport, no stream objects.

aiohttp's client still connects, sends the request and parses the response head (so retries, timeouts, TLS and
pooling stay aiohttp's), but from the first body byte on, the bytes never enter an aiohttp `StreamReader` or
`StreamResponse.write`: a `Pipe` protocol on the backend's transport writes each piece straight to the client's
transport from `data_received`. Per piece that is one write, one byte count and the framing check that finds
the end of the body; no task wake-up, no future, no parsing of the content. The framing passes through
unchanged (a chunked body stays chunked, byte for byte; a Content-Length body keeps its length), which is why
the client response is a `RawResponse` whose writer adds no framing of its own.

How the head and the body are split. aiohttp's response parser consumes whatever bytes it is given, body
included, and a body it has decoded cannot be re-framed. So every connection of the relaying client session
carries a `Tap` in front of aiohttp's protocol (installed by `Connector.connect`). For a request sent under
`armed()`, the tap forwards bytes up to the end of the final response head (interim 1xx heads pass through; a
101 switches it to plain forwarding), then holds the rest until the relay takes it over (`start()`).
`release()` instead hands the held bytes to aiohttp, for the bodies this module does not relay itself (see
`framing`). Requests not sent under `armed()` (metric scrapes, WebSocket upgrades) see a tap that only
forwards.

Semantics the protocol path keeps (proxy.py holds the lease and releases it in `finally`):
- backpressure both ways: a client transport over its high-water mark pauses reading from the backend until
  aiohttp's writer drains (`Pipe.paused`, resumed by the relaying coroutine); request bodies still go through
  aiohttp's writer, which honours the backend transport's flow control (the pipe forwards pause/resume);
- the end of the body is found from the framing (`0\\r\\n` + trailers for chunked, the byte count otherwise), so
  only a cleanly finished backend connection goes back to the pool; any other ending closes it;
- the client leaving is seen at the next piece (`is_closing()`) or by aiohttp cancelling the handler;
- a backend dying mid-stream ends an SSE body with a clean terminal event when the cut falls between chunks,
  and cuts the client connection otherwise (a truncated body, never a short "success").

What this module does not do: pick backends, retry, count health (proxy.py), or relay bodies whose framing is
read-until-close or that an HTTP/1.0 client cannot take chunked: those go back to aiohttp (`release()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
from collections.abc import Iterator
from typing import Final

import aiohttp
from aiohttp import abc, web
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

MAX_HEAD_BYTES: Final = 256 * 1024
"""A response head longer than this is not looked for: the tap forwards, and aiohttp's parser (which allows
8 KiB per line) refuses it with its own error."""

MAX_HELD_BYTES: Final = 256 * 1024
"""Body bytes held between the head and the relay's claim before the backend is paused (backpressure while
the client's head is being sent)."""

MAX_SIZE_LINE_BYTES: Final = 4096
"""Longest chunk-size line (size plus extensions) accepted; longer is a framing error, not a chunk."""

_SIZE_LINE: Final = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")
"""A chunk-size line (RFC 9112 section 7.1): hex size, optional extensions. Strict so that the balancer and the
client can never disagree on where a chunk ends (no `0x`, `+`, `_` or spaces before the digits)."""

_ARMED: Final = contextvars.ContextVar("forestall_relay_armed", default=False)

_FORWARD, _HEAD, _HELD = 0, 1, 2
"""Tap modes: pass everything to aiohttp; look for the end of the head; hold body bytes for the relay."""


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """Requests sent in this block get their body held after the head, for `start()` or `release()`."""
    token = _ARMED.set(True)
    try:
        yield
    finally:
        _ARMED.reset(token)


class Connector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, with a `Tap` in front of every connection's protocol."""

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109  (aiohttp's signature)
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        transport = conn.transport
        inner = conn.protocol
        if transport is not None and inner is not None:
            tap = transport.get_protocol()
            if not isinstance(tap, Tap):
                tap = Tap(inner, transport)
                transport.set_protocol(tap)
            tap.arm(_ARMED.get())
        return conn


class Tap(asyncio.Protocol):
    """Sits in front of aiohttp's protocol on a backend connection; splits the head from the body."""

    __slots__ = ("held", "held_bytes", "inner", "mode", "partial", "transport")

    def __init__(self, inner: ResponseHandler, transport: asyncio.Transport) -> None:
        self.inner = inner
        self.transport = transport
        self.mode = _FORWARD
        self.partial = b""
        self.held: list[bytes] = []
        self.held_bytes = 0

    def arm(self, hold: bool) -> None:
        """A new request goes out on this connection: hold its body after the head when `hold`."""
        self.mode = _HEAD if hold else _FORWARD
        self.partial = b""
        self.held = []
        self.held_bytes = 0

    @property
    def holding(self) -> bool:
        """True while the body is held for this response (not yet claimed or released, connection open)."""
        return self.mode == _HELD

    def take(self) -> list[bytes]:
        """The held body bytes, handing the connection over to the caller (who sets its own protocol)."""
        held = self.held
        self.held, self.held_bytes, self.mode = [], 0, _FORWARD
        self._resume()
        return held

    def release(self) -> None:
        """Give the held body bytes to aiohttp and forward from now on (aiohttp reads this body itself)."""
        if self.mode != _FORWARD:
            held, self.held, self.held_bytes, self.mode = self.held, [], 0, _FORWARD
            partial, self.partial = self.partial, b""
            for piece in held:
                self.inner.data_received(piece)
            if partial:
                self.inner.data_received(partial)
            self._resume()

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == _FORWARD:
            self.inner.data_received(data)
        elif mode == _HELD:
            self.held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > MAX_HELD_BYTES:
                with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                    self.transport.pause_reading()
        else:
            self._find_head(self.partial + data if self.partial else data)

    def _find_head(self, buf: bytes) -> None:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self.partial, self.mode = b"", _FORWARD
                    self.inner.data_received(buf)
                else:
                    self.partial = buf
                return
            head, buf = buf[: end + 4], buf[end + 4 :]
            self.partial = b""
            status = head[9:12]
            self.inner.data_received(head)
            if status == b"101":  # switching protocols: what follows is not HTTP
                self.mode = _FORWARD
                if buf:
                    self.inner.data_received(buf)
                return
            if status[:1] != b"1":  # the final head: hold the body for the relay
                self.mode = _HELD
                if buf:
                    self.held.append(buf)
                    self.held_bytes = len(buf)
                return
            if not buf:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()  # aiohttp gets the held bytes before it learns the connection is gone
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self.mode == _HELD:
            self.release()
        self.inner.eof_received()
        return None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _resume(self) -> None:
        with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
            self.transport.resume_reading()


DONE, MIDSTREAM, CLIENT_GONE, INVALID = "done", "midstream", "client_gone", "invalid"
"""How a relayed body ended: finished by its framing; backend connection lost or idle-cut first; client
transport closed; the backend broke the chunked framing."""


class Pipe(asyncio.Protocol):
    """The backend transport's protocol while a body is relayed: each piece goes to the client transport.

    Framing: `length` is the Content-Length still to come, or None for chunked, where `skip` is the chunk
    data (plus its CRLF) still to come, `carry` an incomplete size line, and `trailers` marks the trailer
    section after the last chunk.
    """

    __slots__ = (
        "backend",
        "carry",
        "client",
        "client_protocol",
        "first",
        "inner",
        "last",
        "length",
        "outcome",
        "paused",
        "reusable",
        "skip",
        "tap",
        "total_bytes",
        "trailers",
        "waiter",
    )

    def __init__(
        self,
        tap: Tap,
        client: asyncio.Transport,
        client_protocol: web.RequestHandler,
        *,
        length: int | None,
    ) -> None:
        self.tap = tap
        self.inner = tap.inner
        self.backend = tap.transport
        self.client = client
        self.client_protocol = client_protocol
        self.length = length
        self.skip = 0
        self.carry = b""
        self.trailers = False
        self.total_bytes = 0
        """Body bytes relayed so far (read by the idle sweep and the metrics)."""
        self.first: bytes | None = None
        self.last = b""
        self.outcome: str | None = None
        self.paused = False
        self.reusable = False
        """True once the body ended exactly at its framing's end: the backend connection may be pooled."""
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        if self.client.is_closing():
            self._end(CLIENT_GONE)
            self.backend.close()
            return
        length = self.length
        if length is None:
            try:
                end = self._scan(data)
            except ValueError:
                self._end(INVALID)
                self.backend.close()
                return
        else:
            length -= len(data)
            self.length = length
            end = len(data) + length if length <= 0 else -1
        clean = True
        if end >= 0 and end < len(data):
            data = data[:end]  # bytes past the end of the body: the connection is not reused
            clean = False
        self.client.write(data)
        self.total_bytes += len(data)
        self.last = data
        if self.first is None:
            self.first = data
            self._wake()
        if end >= 0:
            self._finish(clean=clean)
        elif self.client_protocol.writing_paused:
            self.paused = True
            self.backend.pause_reading()
            self._wake()

    def _scan(self, data: bytes) -> int:
        """Index just past the end of the chunked body within `data`, or -1 when it goes on."""
        n = len(data)
        pos = self.skip
        if pos >= n:
            self.skip = pos - n
            return -1
        self.skip = 0
        base = 0
        if self.carry:  # an incomplete size line from the last piece (then pos is 0)
            base = len(self.carry)
            data = self.carry + data
            self.carry = b""
            n += base
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > MAX_SIZE_LINE_BYTES:
                    raise ValueError("chunk-size line too long")
                self.carry = data[pos:]
                return -1
            if self.trailers:
                if eol == pos:
                    return eol + 2 - base
                pos = eol + 2
                continue
            match = _SIZE_LINE.fullmatch(data, pos, eol)
            if match is None:
                raise ValueError("invalid chunk-size line")
            size = int(match.group(1), 16)
            pos = eol + 2
            if size == 0:
                self.trailers = True
                continue
            pos += size + 2
            if pos >= n:
                self.skip = pos - n
                return -1

    @property
    def between_chunks(self) -> bool:
        """True when the client has received whole chunks only (a terminal event can still be appended)."""
        return self.length is None and self.skip == 0 and not self.carry and not self.trailers

    def _finish(self, *, clean: bool) -> None:
        self.outcome = DONE
        if clean:  # the connection is at a message boundary: aiohttp may pool it
            self.reusable = True
            self.backend.set_protocol(self.tap)
        else:
            self.backend.close()
        self._wake()

    def _end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def resume(self) -> None:
        """The client drained: read from the backend again."""
        self.paused = False
        if self.outcome is None:
            with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                self.backend.resume_reading()

    def close(self) -> None:
        """Cut the backend connection (the idle sweep's abort); the relay ends as a backend failure."""
        self.backend.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(MIDSTREAM)
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return None  # a backend half-close mid-body ends it: close, then connection_lost

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def body_sample(piece: bytes, *, chunked: bool) -> bytes:
    """`piece` without its chunked framing (best effort, for looking at a first or last piece after the fact)."""
    if not chunked:
        return piece
    out: list[bytes] = []
    pos = 0
    while True:
        eol = piece.find(b"\r\n", pos)
        match = None if eol < 0 else _SIZE_LINE.fullmatch(piece, pos, eol)
        if match is None:
            return b"".join(out) if out else piece
        size = int(match.group(1), 16)
        if size == 0:
            return b"".join(out)
        out.append(piece[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2


def terminal_chunk(payload: bytes) -> bytes:
    """`payload` as the last data chunk of a chunked body, followed by the end of the body."""
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)


class RawResponse(web.StreamResponse):
    """A response whose body bytes arrive already framed: aiohttp writes the head and adds no framing.

    The headers given must say the framing (`Transfer-Encoding: chunked` or `Content-Length`), as the backend's
    did; `write_eof()` then writes nothing, and aiohttp goes on with the client's keep-alive connection.
    """

    _length_check = False


def framing(upstream: aiohttp.ClientResponse, request: web.Request) -> int | bool | None:
    """How the body is relayed: its Content-Length, None for chunked, False when aiohttp must carry it.

    False for bodies that end when the connection closes, for chunked bodies to HTTP/1.0 clients (they cannot
    take chunked), for responses without a body (HEAD, 1xx, 204, 304, length 0), and when the tap is not
    holding this response's body.
    """
    if request.method == "HEAD" or upstream.status < 200 or upstream.status in (204, 304):
        return False
    connection = upstream.connection
    tap = None if connection is None or connection.transport is None else connection.transport.get_protocol()
    if not isinstance(tap, Tap) or not tap.holding:
        return False
    encoding = upstream.headers.get("Transfer-Encoding", "")
    if encoding:
        if encoding.rsplit(",", 1)[-1].strip().lower() != "chunked" or request.version < (1, 1):
            return False
        return None
    length = upstream.content_length
    if length is None or length <= 0:
        return False
    return length


def release(upstream: aiohttp.ClientResponse) -> None:
    """Let aiohttp read this response's body itself (its held bytes are handed over)."""
    connection = upstream.connection
    if connection is not None and connection.transport is not None:
        tap = connection.transport.get_protocol()
        if isinstance(tap, Tap):
            tap.release()


def start(upstream: aiohttp.ClientResponse, request: web.Request, *, length: int | None) -> Pipe | None:
    """Switch the backend connection to a `Pipe` into the client transport; None when the client is gone.

    Call after the client's response head went out (`RawResponse.prepare`): the held bytes are written at once.
    """
    connection = upstream.connection
    client = request.transport
    assert connection is not None and connection.transport is not None
    tap = connection.transport.get_protocol()
    assert isinstance(tap, Tap)
    if client is None:
        tap.release()
        return None
    pipe = Pipe(tap, client, request.protocol, length=length)
    held = tap.take()
    tap.transport.set_protocol(pipe)
    for piece in held:
        pipe.data_received(piece)
    return pipe


async def wait_first(pipe: Pipe, *, timeout_s: float) -> None:
    """Wait for the first body byte (or the end of the body).

    Raises:
        TimeoutError: nothing came within `timeout_s`.
    """
    if pipe.first is None and pipe.outcome is None:
        pipe.waiter = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(max(timeout_s, 0.001)):
            await pipe.waiter


async def follow(pipe: Pipe, writer: abc.AbstractStreamWriter) -> None:
    """Wait for the end of the body (`pipe.outcome`), draining the client whenever it pushes back.

    Raises:
        ConnectionResetError: the client went away while it was being drained.
    """
    loop = asyncio.get_running_loop()
    while pipe.outcome is None:
        if pipe.paused:
            await writer.drain()
            pipe.resume()
            continue
        pipe.waiter = loop.create_future()
        await pipe.waiter
