"""The HTTP relay: one client request in, one backend stream out, bytes streamed both ways.

Flow of a request: validate what is cheap to validate (body size, MCP session) -> read at most
`retry_buffer_bytes` of the body (so a failed attempt can be replayed) -> place a lease (runtime.Balancer.place)
-> send to the backend -> on a connect error, reset, first-byte timeout or 503 before anything reached the client,
retry on another backend within the retry budget -> relay the status and headers -> relay the body.

The per-chunk path is protocol-level (relay.py): after the response head, the backend connection's protocol
is switched to a `relay.Pipe` that writes each piece straight to the client transport, with the backend's
chunked or Content-Length framing passed through unchanged; this module only waits for the first byte (to time
it and enforce `first_byte_timeout_s`), for the end, and drains the client when it pushes back. Bodies that
framing cannot carry (read-until-close, HEAD and bodiless statuses, chunked to an HTTP/1.0 client) take the
aiohttp path (`_relay_streamed`: `readany()` then `resp.write()`). Idle timeouts are found by a once-a-second
sweep over open streams (runtime.Balancer.sweep_idle, no timer re-armed per chunk), relayed bytes are counted by
the pipe, and failure inspection looks at the first and last piece after the fact (health.response_error).
Response bodies are never buffered; request bodies only up to the retry buffer.

Headers: hop-by-hop headers (RFC 9110 section 7.6.1: Connection and every header it names, Keep-Alive,
Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-Authenticate/-Authorization) are dropped in
both directions (the protocol path declares `Transfer-Encoding: chunked` again for the chunked body it passes
through); `X-Forwarded-For`, `-Proto` and `-Host` are added; Content-Length is kept when the length is
known; bytes pass through undecoded (no decompression), so Content-Encoding stays true.

Endings: a stream ends when the backend finishes, the client goes away (write fails, or aiohttp cancels the
handler), the backend fails mid-stream, or the task is cancelled; in every case the lease is released in
`finally`. A backend failing mid-stream ends an SSE response with a clean terminal event
`event: error` / `data: {"error": {...}}` and a proper end of the chunked body when the failure falls between
chunks; any other body is cut (the connection closes without the final chunk), so the client sees a truncated
body rather than a short "success". Only a backend connection whose body ended exactly at its framing's end
goes back to the pool.

What this module does not do: WebSocket (websockets.py), choose backends (runtime.py), or admin endpoints.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import http_exceptions, web
from multidict import CIMultiDict
from yarl import URL

from balancer import health, relay, websockets
from balancer.backends import Backend, Lease
from balancer.errors import NoBackendError, UpstreamError
from balancer.runtime import Balancer
from balancer.sessions import METHOD_HEADER, SESSION_HEADER

BALANCER: Final = web.AppKey("balancer", Balancer)

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""RFC 9110 section 7.6.1 connection-specific headers, plus the de-facto Keep-Alive and Proxy-Connection."""

NOT_FORWARDED: Final = HOP_BY_HOP | {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
"""Request headers we replace: Host is the backend's, the X-Forwarded-* are rebuilt."""

INITIALIZE: Final = b'"method":"initialize"'
"""How a (compact) JSON-RPC `initialize` request names itself; such a request opens a new MCP session, which is
placed under the bounded-load rule. Legacy clients send no Mcp-Method header, so the small, already buffered
body is searched once (never the response, never per chunk)."""
INITIALIZE_SCAN_BYTES: Final = 4096

RETRY_AFTER_S: Final = 5
"""Retry-After on 503: about the time a queued stream waits, short enough that clients come back soon."""

TERMINAL_SSE_ERROR: Final = (
    b'event: error\ndata: {"error": {"type": "upstream_error", "code": 502, '
    b'"message": "the backend failed during the stream; it was ended by the balancer"}}\n\n'
)
"""Last event sent to an SSE client whose backend died mid-stream: a clean end the client can parse."""
TERMINAL_SSE_CHUNK: Final = relay.terminal_chunk(TERMINAL_SSE_ERROR)
"""The same event as the last chunk of a chunked body relayed at the protocol level (relay.py)."""


class BodyTooLarge(Exception):
    """The request body exceeded max_body_bytes."""


async def handle(request: web.Request) -> web.StreamResponse:
    """Relay one client request to a backend (the catch-all route of the proxy app)."""
    bal = request.app[BALANCER]
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await websockets.relay(request, bal)
    limit = bal.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return error_response(
            413, f"request body of {request.content_length} bytes exceeds the limit of {limit}"
        )

    session_id = request.headers.get(SESSION_HEADER)
    pinned: Backend | None = None
    if session_id is not None:
        pinned = bal.sessions.lookup(session_id)
        if pinned is None:
            return error_response(
                404, f"MCP session {session_id!r} is unknown or its backend is gone; initialize a new session"
            )

    try:
        body = await _read_body(request, buffer_bytes=bal.config.retry_buffer_bytes, limit_bytes=limit)
    except BodyTooLarge:
        return error_response(413, f"request body exceeds the limit of {limit} bytes")
    except (aiohttp.ClientPayloadError, http_exceptions.HttpProcessingError, ValueError) as exc:
        return error_response(400, f"malformed request body: {exc}")

    affinity = _affinity_key(request, bal)
    method = request.headers.get(METHOD_HEADER) if session_id is None else None
    headers = _forward_headers(request, streamed=isinstance(body, _StreamedBody))
    url_tail = request.raw_path
    bal.budget.on_request()
    tried: set[str] = set()
    last_error = "no backend could take the stream"
    last_status = 502
    lease: Lease | None = None
    new_session = method == "initialize" or (
        session_id is None and isinstance(body, bytes) and INITIALIZE in body[:INITIALIZE_SCAN_BYTES]
    )
    try:
        for attempt in range(1, bal.config.max_attempts + 1):
            start_s = bal.clock.monotonic()
            if pinned is not None:
                lease = bal.pool.lease(pinned)
            elif attempt == 1:
                lease = await bal.place(affinity_key=affinity, method=method, new_session=new_session)
            else:
                backend = bal.choose(exclude=frozenset(tried), method=method)
                if backend is None:
                    break
                lease = bal.pool.lease(backend)
            backend = lease.backend
            tried.add(backend.address)
            try:
                upstream = await _send(request, bal, backend, headers, body, url_tail)
            except UpstreamError as exc:
                lease.release()
                lease = None
                if isinstance(body, _StreamedBody) and body.too_large:
                    return error_response(413, f"request body exceeds the limit of {limit} bytes")
                bal.outliers.failure(backend, exc.reason)
                last_error = str(exc)
                last_status = 504 if exc.reason == "timeout" else 502
                if _may_retry(bal, body, pinned, exc.reason):
                    continue
                if pinned is not None and session_id is not None and bal.sessions.lookup(session_id) is None:
                    return error_response(
                        404, f"MCP session {session_id!r}: its backend is gone; initialize a new session"
                    )
                return error_response(last_status, str(exc))
            if (
                upstream.status == 503
                and attempt < bal.config.max_attempts
                and _may_retry(bal, body, pinned, "status_503")
            ):
                upstream.close()
                lease.release()
                lease = None
                bal.outliers.failure(backend, "status_503")
                last_error = f"backend {backend.address} answered 503"
                continue
            return await _relay(request, bal, lease, upstream, start_s=start_s, session_id=session_id)
    except NoBackendError as exc:
        return error_response(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})
    except asyncio.CancelledError:
        if lease is not None:  # the client left (aiohttp cancelled us) or the server is stopping
            lease.backend.count_failure("cancelled")
        raise
    finally:
        if lease is not None:
            lease.release()
    return error_response(last_status, f"{last_error} (tried {', '.join(sorted(tried))})")


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON error body every balancer-made answer carries."""
    body = {"error": {"code": status, "message": message, "type": "balancer_error"}}
    return web.json_response(body, status=status, headers=headers)


async def _send(
    request: web.Request,
    bal: Balancer,
    backend: Backend,
    headers: CIMultiDict[str],
    body: bytes | _StreamedBody | None,
    url_tail: str,
) -> aiohttp.ClientResponse:
    assert bal.client is not None, "Balancer.start() was not awaited"
    url = URL(f"{bal.scheme}://{backend.address}{url_tail}", encoded=True)
    try:
        async with asyncio.timeout(bal.config.first_byte_timeout_s):
            with relay.armed():  # the body stays unread after the head, for the protocol-level relay
                return await bal.client.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False, compress=None
                )
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamError(
            f"cannot connect to backend {backend.address}: {exc.os_error}", reason="connect"
        ) from exc
    except TimeoutError as exc:
        raise UpstreamError(f"backend {backend.address} sent no response in time", reason="timeout") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            f"backend {backend.address} failed before responding: {exc!r}", reason="reset"
        ) from exc


def _may_retry(
    bal: Balancer, body: bytes | _StreamedBody | None, pinned: Backend | None, reason: str
) -> bool:
    if pinned is not None:
        return False
    if isinstance(body, _StreamedBody) and (body.started or reason != "connect"):
        return False
    return bal.budget.try_spend()


async def _relay(
    request: web.Request,
    bal: Balancer,
    lease: Lease,
    upstream: aiohttp.ClientResponse,
    *,
    start_s: float,
    session_id: str | None,
) -> web.StreamResponse:
    backend = lease.backend
    learned = upstream.headers.get(SESSION_HEADER)
    if learned is not None and session_id is None and upstream.status < 300:
        bal.sessions.bind(learned, backend)
    elif session_id is not None and (
        upstream.status == 404 or (request.method == "DELETE" and upstream.status < 300)
    ):
        bal.sessions.end(session_id)
    length = relay.framing(upstream, request)
    if length is False:
        relay.release(upstream)
        return await _relay_streamed(request, bal, lease, upstream, start_s=start_s)
    chunked = length is None
    headers = _backward_headers(upstream)
    if chunked:
        headers.popall("Content-Length", None)
        headers["Transfer-Encoding"] = "chunked"
    resp = relay.RawResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    content_type = upstream.headers.get("Content-Type", "")
    pipe: relay.Pipe | None = None
    ok = False
    try:
        writer = await resp.prepare(request)
        assert writer is not None, "a prepared response has a writer"
        pipe = relay.start(upstream, request, length=length)
        if pipe is None:
            raise ConnectionResetError("the client left before the body")
        remaining_s = bal.config.first_byte_timeout_s - (bal.clock.monotonic() - start_s)
        await relay.wait_first(pipe, timeout_s=remaining_s)
        now_s = bal.clock.monotonic()
        if pipe.first is not None:
            backend.observe_ttfb(now_s - start_s, now_s)
        lease.watch(pipe, now_s)
        await relay.follow(pipe, writer)
        if pipe.outcome == relay.DONE:
            await resp.write_eof()
            ok = True
        elif pipe.outcome == relay.CLIENT_GONE:
            backend.count_failure("client_gone")
        else:
            bal.outliers.failure(backend, "timeout" if lease.idle_timed_out else "midstream")
            await _end_broken(request, resp, content_type, pipe=pipe)
    except (ConnectionResetError, aiohttp.ClientError, TimeoutError) as exc:
        if _client_gone(request):
            backend.count_failure("client_gone")
        else:
            timed_out = isinstance(exc, TimeoutError) or lease.idle_timed_out
            bal.outliers.failure(backend, "timeout" if timed_out else "midstream")
            await _end_broken(request, resp, content_type, pipe=pipe)
    finally:
        if pipe is not None:
            backend.relayed_bytes += pipe.total_bytes
        lease.release()
        if ok and pipe is not None and pipe.reusable:
            upstream.content.feed_eof()  # aiohttp never saw the body: mark it read, so the link is pooled
            upstream.release()
        else:
            upstream.close()
    if ok and pipe is not None:
        first, last = _error_samples(pipe, chunked=chunked)
        _judge(bal, backend, upstream.status, first, last, content_type)
    return resp


async def _relay_streamed(
    request: web.Request, bal: Balancer, lease: Lease, upstream: aiohttp.ClientResponse, *, start_s: float
) -> web.StreamResponse:
    """Relay a body through aiohttp's stream objects: for the framings relay.py leaves to aiohttp."""
    backend = lease.backend
    resp = web.StreamResponse(
        status=upstream.status, reason=upstream.reason, headers=_backward_headers(upstream)
    )
    content = upstream.content
    content_type = upstream.headers.get("Content-Type", "")
    first = b""
    chunk = b""
    ok = False
    try:
        await resp.prepare(request)
        remaining_s = bal.config.first_byte_timeout_s - (bal.clock.monotonic() - start_s)
        async with asyncio.timeout(max(remaining_s, 0.001)):
            first = await content.readany()
        now_s = bal.clock.monotonic()
        backend.observe_ttfb(now_s - start_s, now_s)
        lease.watch(_Counted(upstream), now_s)
        if first:
            await resp.write(first)
            chunk = first
            while piece := await content.readany():
                await resp.write(piece)
                chunk = piece
        await resp.write_eof()
        ok = True
    except (ConnectionResetError, aiohttp.ClientError, TimeoutError) as exc:
        if _client_gone(request):
            backend.count_failure("client_gone")
        else:
            timed_out = isinstance(exc, TimeoutError) or lease.idle_timed_out
            bal.outliers.failure(backend, "timeout" if timed_out else "midstream")
            await _end_broken(request, resp, content_type, pipe=None)
    finally:
        backend.relayed_bytes += content.total_bytes
        lease.release()
        if ok:
            upstream.release()
        else:
            upstream.close()
    if ok:
        _judge(bal, backend, upstream.status, first, chunk, content_type)
    return resp


def _error_samples(pipe: relay.Pipe, *, chunked: bool) -> tuple[bytes, bytes]:
    """The first and last piece, unframed, for health.response_error; empty when they cannot hold an error.

    Every error shape it finds names `error` or `isError`, so a piece without `rror` is not unframed at all.
    """
    first = pipe.first or b""
    first = relay.body_sample(first, chunked=chunked) if b"rror" in first else b""
    if pipe.last is pipe.first:
        return first, first
    last = relay.body_sample(pipe.last, chunked=chunked) if b"rror" in pipe.last else b""
    return first, last


class _Counted:
    """An aiohttp response as the idle sweep watches it (its byte count, and a way to cut it)."""

    __slots__ = ("_upstream",)

    def __init__(self, upstream: aiohttp.ClientResponse) -> None:
        self._upstream = upstream

    @property
    def total_bytes(self) -> int:
        return self._upstream.content.total_bytes

    def close(self) -> None:
        self._upstream.close()


def _judge(
    bal: Balancer, backend: Backend, status: int, first: bytes, last: bytes, content_type: str
) -> None:
    """Count a finished response as the backend's success or failure (errors hidden in a 200 included)."""
    backend.completed += 1
    hidden = health.response_error(first, last, content_type=content_type) if status == 200 else None
    if hidden is not None:
        bal.outliers.failure(backend, hidden)
    elif status >= 500:
        bal.outliers.failure(backend, f"status_{status}")
    else:
        bal.outliers.success(backend)


async def _end_broken(
    request: web.Request, resp: web.StreamResponse, content_type: str, *, pipe: relay.Pipe | None
) -> None:
    """End a stream whose backend failed after headers went out: clean SSE error event, else cut.

    On the protocol path (`pipe`) the event can only be added as a whole chunk between the backend's chunks.
    """
    if "event-stream" in content_type and not _client_gone(request) and resp.prepared:
        try:
            if pipe is None:
                await resp.write(TERMINAL_SSE_ERROR)
                await resp.write_eof()
                return
            if pipe.between_chunks and request.transport is not None:
                request.transport.write(TERMINAL_SSE_CHUNK)
                await resp.write_eof()
                return
        except (ConnectionResetError, aiohttp.ClientError):
            pass
    if request.transport is not None:
        request.transport.close()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _affinity_key(request: web.Request, bal: Balancer) -> str | None:
    config = bal.config
    if config.affinity_header is not None:
        value = request.headers.get(config.affinity_header)
        if value:
            return value
    if config.affinity_cookie is not None:
        value = request.cookies.get(config.affinity_cookie)
        if value:
            return value
    return None


def _forward_headers(request: web.Request, *, streamed: bool) -> CIMultiDict[str]:
    incoming = request.headers
    drop = NOT_FORWARDED
    connection = incoming.get("Connection")
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(",")}
    if not streamed:
        drop = drop | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)
    peer = request.remote or ""
    prior = incoming.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    out["X-Forwarded-Host"] = request.host
    return out


def _backward_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    incoming = upstream.headers
    drop = HOP_BY_HOP
    connection = incoming.get("Connection")
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(",")}
    return CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)


class _StreamedBody:
    """A request body too large for the retry buffer: the buffered head, then the rest as it arrives."""

    def __init__(self, head: list[bytes], request: web.Request, *, limit_bytes: int, seen_bytes: int) -> None:
        self.head = head
        self.request = request
        self.limit_bytes = limit_bytes
        self.seen_bytes = seen_bytes
        self.started = False
        self.too_large = False
        """Set when the client sent more than the limit: the attempt failed because of the client."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.started = True
        for piece in self.head:
            yield piece
        async for piece in self.request.content.iter_any():
            self.seen_bytes += len(piece)
            if self.seen_bytes > self.limit_bytes:
                self.too_large = True
                raise BodyTooLarge(f"request body exceeds {self.limit_bytes} bytes")
            yield piece


async def _read_body(
    request: web.Request, *, buffer_bytes: int, limit_bytes: int
) -> bytes | _StreamedBody | None:
    """The whole body if it fits the retry buffer, else a streamed body; None when there is none."""
    if not request.body_exists:
        return None
    pieces: list[bytes] = []
    seen = 0
    content = request.content
    while seen <= buffer_bytes:
        piece = await content.readany()
        if not piece:
            return b"".join(pieces)
        seen += len(piece)
        if seen > limit_bytes:
            raise BodyTooLarge
        pieces.append(piece)
    return _StreamedBody(pieces, request, limit_bytes=limit_bytes, seen_bytes=seen)
