"""The HTTP relay: one client request in, one backend stream out, bytes streamed both ways.

Flow of a request: refuse what must not reach a backend (inbound.py: routes, methods, header bytes) -> resolve
the MCP routing (a sealed legacy session, or a stateless request's method and name) -> read at most
`retry_buffer_bytes` of the body under its own deadlines (so a failed attempt can be replayed, and a slow
upload is the client's problem, not a backend's) -> attempts -> relay the status and headers -> relay the body.

Attempts are one state machine (`_Attempts`): each takes a lease through `runtime.Balancer.place` (so a retry
waits in the admission queue behind other streams and obeys the bounded-load rule like a first try), sends,
and ends in exactly one of: relay (the lease goes to `_relay`, which releases it), retry elsewhere (the lease
is released once, here), or an answer. A retry happens only before any byte reached the client, within the
retry budget and `max_attempts`, never for a pinned session, and, for a request that is not idempotent, only
when the backend provably did not act on it: the connection was refused or could not be made (no byte was
written), or it answered 503 (declined before acting). A POST that hung after delivery is not sent again
(it reached two backends once). A 503 with nowhere to retry is relayed as it is, with its Retry-After.

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

Blame: `health.blame` decides whether a finished response counts against the backend; a client that stopped
reading (cut by the write deadline), left, sent a slow or oversized body, or caused an application error is
recorded under its own reason and never ejects anyone. Error bodies are fixed sentences (responses.py); the
details, redacted, go to the log.

What this module does not do: WebSocket (websockets.py), choose backends (runtime.py), or admin endpoints.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import http_exceptions, web
from multidict import CIMultiDict
from yarl import URL

from balancer import health, inbound, relay, responses, websockets
from balancer.backends import Backend, Lease
from balancer.errors import NoBackendError, UpstreamError
from balancer.runtime import Balancer
from balancer.sessions import METHOD_HEADER, NAME_HEADER, SESSION_HEADER

log = logging.getLogger(__name__)

BALANCER: Final = web.AppKey("balancer", Balancer)

INITIALIZE: Final = b'"method":"initialize"'
"""How a (compact) JSON-RPC `initialize` request names itself; such a request opens a new MCP session, which is
placed under the bounded-load rule. Legacy clients send no Mcp-Method header, so the small, already buffered
body is searched once (never the response, never per chunk)."""
INITIALIZE_SCAN_BYTES: Final = 4096

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""RFC 9110 section 9.2.2: sending these twice has the effect of sending them once, so any failure before the
first byte may be retried. Others (POST, PATCH) are retried only when the backend provably did not act."""

NOT_ACTED: Final = frozenset({"connect", "status_503"})
"""Failures after which the backend provably did not act on the request: no connection, or an explicit 503."""

FAILURE_ANSWERS: Final = {
    "connect": (502, "cannot connect to a backend"),
    "timeout": (504, "the backend did not answer in time"),
    "reset": (502, "the backend failed before answering"),
}
"""What a client is told when attempts fail: fixed sentences; the details (redacted) go to the log."""

TERMINAL_SSE_ERROR: Final = (
    b'event: error\ndata: {"error": {"type": "upstream_error", "code": 502, '
    b'"message": "the backend failed during the stream; it was ended by the balancer"}}\n\n'
)
"""Last event sent to an SSE client whose backend died mid-stream: a clean end the client can parse."""
TERMINAL_SSE_CHUNK: Final = relay.terminal_chunk(TERMINAL_SSE_ERROR)
"""The same event as the last chunk of a chunked body relayed at the protocol level (relay.py)."""


class BodyTooLarge(Exception):
    """The request body exceeded max_body_bytes."""


class BodyTimeout(Exception):
    """The request body did not arrive within its deadline or paused too long."""


async def handle(request: web.Request) -> web.StreamResponse:
    """Relay one client request to a backend (the catch-all route of the proxy app)."""
    bal = request.app[BALANCER]
    config = bal.config
    refused = inbound.refuse(request, config)
    if refused is not None:
        return refused
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await websockets.relay(request, bal)
    limit = config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return responses.error_response(413, f"the request body exceeds the limit of {limit} bytes")

    plan = _plan(request, bal)
    if isinstance(plan, web.Response):
        return plan
    try:
        body = await _read_body(request, bal)
    except BodyTooLarge:
        return responses.error_response(413, f"the request body exceeds the limit of {limit} bytes")
    except BodyTimeout:
        return responses.error_response(408, "the request body did not arrive in time")
    except (aiohttp.ClientPayloadError, http_exceptions.HttpProcessingError, ValueError):
        return responses.error_response(400, "malformed request body")
    if plan.new_session is None:
        plan.new_session = isinstance(body, bytes) and INITIALIZE in body[:INITIALIZE_SCAN_BYTES]
    headers = inbound.forward_headers(request, keep_length=isinstance(body, _StreamedBody))
    if plan.backend_session_id is not None:
        headers[SESSION_HEADER] = plan.backend_session_id
    return await _Attempts(request, bal, plan, body, headers).run()


@dataclass
class _Plan:
    """How a request is routed: pinned to a session's backend, or placed (with affinity or bounded load)."""

    mcp: bool
    pinned: Backend | None = None
    session_id: str | None = None
    """The sealed id the client sent."""
    backend_session_id: str | None = None
    """The backend's own id, restored on the way in."""
    affinity: str | None = None
    method: str | None = None
    new_session: bool | None = None
    """None until known: an initialize named in the body is found after the body is read."""


def _plan(request: web.Request, bal: Balancer) -> _Plan | web.Response:
    """The routing of one request, or the answer when its session cannot be served."""
    mcp = inbound.is_mcp(request, bal.config)
    session_id = request.headers.get(SESSION_HEADER) if mcp else None
    if session_id is not None:
        route = bal.open_session(session_id)
        if route.refusal in ("unknown", "gone") or route.backend is None:
            return responses.error_response(
                404, "the MCP session is unknown or its backend is gone; initialize a new session"
            )
        if route.refusal == "ejected":
            return responses.unavailable(
                "the MCP session's backend is temporarily out of service; retry later",
                retry_after_s=route.retry_after_s,
            )
        bal.sessions.bind(session_id, route.backend, client=request.remote or "")
        return _Plan(
            mcp, pinned=route.backend, session_id=session_id, backend_session_id=route.backend_session_id
        )
    method = request.headers.get(METHOD_HEADER) if mcp else None
    plan = _Plan(mcp, method=method, affinity=_affinity_key(request, bal))
    if method == "initialize":
        plan.new_session = True
    elif method is not None:
        plan.new_session = False
        if plan.affinity is None:  # stateless MCP: the same tool lands on the same few backends
            plan.affinity = f"mcp\n{method}\n{request.headers.get(NAME_HEADER, '')}"
    elif not mcp:
        plan.new_session = False
    return plan


@dataclass
class _Attempts:
    """One request's attempts, from the first placement to the relay or the final answer."""

    request: web.Request
    bal: Balancer
    plan: _Plan
    body: bytes | _StreamedBody | None
    headers: CIMultiDict[str]
    tried: set[str] = field(default_factory=set)
    failure: tuple[int, str] = (502, "no backend could serve the request")

    async def run(self) -> web.StreamResponse:
        bal = self.bal
        bal.budget.on_request()
        for attempt in range(1, bal.config.max_attempts + 1):
            lease = await self._lease(first=attempt == 1)
            if isinstance(lease, web.Response):
                return lease
            if lease is None:
                break
            answer = await self._attempt(lease, last=attempt == bal.config.max_attempts)
            if answer is not None:
                return answer
        status, message = self.failure
        return responses.error_response(status, message)

    async def _lease(self, *, first: bool) -> Lease | web.Response | None:
        """The next attempt's lease; None when there is nowhere left to try; an answer when none can be had."""
        bal, plan = self.bal, self.plan
        if plan.pinned is not None:
            return bal.pool.lease(plan.pinned) if first else None
        exclude = frozenset(self.tried)
        if not first and not bal.has_other(exclude=exclude, method=plan.method):
            return None
        try:
            return await bal.place(
                exclude=exclude,
                affinity_key=plan.affinity,
                method=plan.method,
                new_session=bool(plan.new_session),
            )
        except NoBackendError as exc:  # its message is the balancer's own, naming no backend
            return responses.unavailable(str(exc)) if first else None

    async def _attempt(self, lease: Lease, *, last: bool) -> web.StreamResponse | None:
        """One attempt on `lease`: the response, or None to retry. Releases the lease unless `_relay` took it."""
        bal, request, body = self.bal, self.request, self.body
        backend = lease.backend
        self.tried.add(backend.address)
        start_s = bal.clock.monotonic()
        relaying = False
        try:
            try:
                upstream = await _send(request, bal, backend, self.headers, body)
            except UpstreamError as exc:
                return self._failed(backend, exc, last=last)
            if upstream.status == 503 and not last and self._may_retry("status_503", backend):
                upstream.close()
                bal.outliers.failure(backend, "status_503")
                self.failure = (502, "the backends were unavailable")
                return None
            try:
                out_headers = inbound.backward_headers(upstream.headers)
                self._sessions(backend, upstream.status, upstream.headers.get(SESSION_HEADER), out_headers)
            except BaseException:
                upstream.close()
                raise
            relaying = True
            return await _relay(
                request, bal, lease, upstream, headers=out_headers, start_s=start_s, plan=self.plan
            )
        except asyncio.CancelledError:  # the client left (aiohttp cancelled us) or the server is stopping
            backend.count_failure("client_stalled" if lease.client_stalled else "cancelled")
            raise
        finally:
            if not relaying:
                lease.release()

    def _failed(self, backend: Backend, exc: UpstreamError, *, last: bool) -> web.StreamResponse | None:
        body = self.body
        if isinstance(body, _StreamedBody) and body.fault is not None:
            backend.count_failure("client_body")
            if body.fault == "too_large":
                limit = self.bal.config.max_body_bytes
                return responses.error_response(413, f"the request body exceeds the limit of {limit} bytes")
            return responses.error_response(408, "the request body did not arrive in time")
        self.bal.outliers.failure(backend, exc.reason)
        log.warning("attempt on %s failed (%s): %s", backend.address, exc.reason, responses.describe(exc))
        self.failure = FAILURE_ANSWERS.get(exc.reason, FAILURE_ANSWERS["reset"])
        if not last and self._may_retry(exc.reason, backend):
            return None
        status, message = self.failure
        return responses.error_response(status, message)

    def _may_retry(self, reason: str, backend: Backend) -> bool:
        """Whether the request may go to another backend after `reason` (spends budget when it may)."""
        plan, body = self.plan, self.body
        if plan.pinned is not None:
            return False
        if isinstance(body, _StreamedBody) and (body.started or reason != "connect"):
            return False
        if self.request.method not in IDEMPOTENT and reason not in NOT_ACTED:
            return False
        exclude = frozenset(self.tried | {backend.address})
        if not self.bal.has_other(exclude=exclude, method=plan.method):
            return False
        return self.bal.budget.try_spend()

    def _sessions(
        self, backend: Backend, status: int, learned: str | None, out_headers: CIMultiDict[str]
    ) -> None:
        """Seal a session the backend opened; forget one it ended (only on the MCP endpoint)."""
        plan, bal, request = self.plan, self.bal, self.request
        if not plan.mcp:
            return
        if learned is not None:
            if plan.session_id is not None and learned == plan.backend_session_id:
                out_headers[SESSION_HEADER] = plan.session_id
            elif status < 300:
                sealed = bal.seal.seal(backend.address, learned)
                out_headers[SESSION_HEADER] = sealed
                bal.sessions.bind(sealed, backend, client=request.remote or "")
            else:
                del out_headers[SESSION_HEADER]
        if plan.session_id is not None and (status == 404 or (request.method == "DELETE" and status < 300)):
            bal.sessions.end(plan.session_id)


async def _send(
    request: web.Request,
    bal: Balancer,
    backend: Backend,
    headers: CIMultiDict[str],
    body: bytes | _StreamedBody | None,
) -> aiohttp.ClientResponse:
    assert bal.client is not None, "Balancer.start() was not awaited"
    url = URL(f"{bal.scheme}://{backend.address}{inbound.target(request)}", encoded=True)
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
            f"backend {backend.address} failed before responding: {type(exc).__name__}: {exc}", reason="reset"
        ) from exc


async def _relay(
    request: web.Request,
    bal: Balancer,
    lease: Lease,
    upstream: aiohttp.ClientResponse,
    *,
    headers: CIMultiDict[str],
    start_s: float,
    plan: _Plan,
) -> web.StreamResponse:
    backend = lease.backend
    length = relay.framing(upstream, request)
    if length is False:
        relay.release(upstream)
        return await _relay_streamed(
            request, bal, lease, upstream, headers=headers, start_s=start_s, plan=plan
        )
    chunked = length is None
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
        lease.watch(pipe, now_s, client=request.transport)
        await relay.follow(pipe, writer)
        if pipe.outcome == relay.DONE:
            await resp.write_eof()
            ok = True
        else:
            await _end_failed(
                request,
                resp,
                bal,
                lease,
                plan,
                content_type,
                timed_out=lease.idle_timed_out,
                pipe=pipe,
                chunked=chunked,
            )
    except (ConnectionResetError, aiohttp.ClientError, TimeoutError) as exc:
        timed_out = isinstance(exc, TimeoutError) or lease.idle_timed_out
        await _end_failed(
            request, resp, bal, lease, plan, content_type, timed_out=timed_out, pipe=pipe, chunked=chunked
        )
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
        _judge(bal, backend, upstream.status, first, last, content_type=content_type, plan=plan)
    return resp


async def _relay_streamed(
    request: web.Request,
    bal: Balancer,
    lease: Lease,
    upstream: aiohttp.ClientResponse,
    *,
    headers: CIMultiDict[str],
    start_s: float,
    plan: _Plan,
) -> web.StreamResponse:
    """Relay a body through aiohttp's stream objects: for the framings relay.py leaves to aiohttp."""
    backend = lease.backend
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
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
        lease.watch(_Counted(upstream), now_s, client=request.transport)
        if first:
            await resp.write(first)
            chunk = first
            while piece := await content.readany():
                await resp.write(piece)
                chunk = piece
        await resp.write_eof()
        ok = True
    except (ConnectionResetError, aiohttp.ClientError, TimeoutError) as exc:
        timed_out = isinstance(exc, TimeoutError) or lease.idle_timed_out
        await _end_failed(request, resp, bal, lease, plan, content_type, timed_out=timed_out)
    finally:
        backend.relayed_bytes += content.total_bytes
        lease.release()
        if ok:
            upstream.release()
        else:
            upstream.close()
    if ok:
        _judge(bal, backend, upstream.status, first, chunk, content_type=content_type, plan=plan)
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
    bal: Balancer,
    backend: Backend,
    status: int,
    first: bytes,
    last: bytes,
    *,
    content_type: str,
    plan: _Plan,
) -> None:
    """Count a finished response as the backend's success or failure (`health.blame`: errors hidden in a
    200 count, application errors the client caused do not)."""
    backend.completed += 1
    verdict = health.blame(
        first,
        last,
        status=status,
        content_type=content_type,
        mcp=plan.mcp,
        in_session=plan.session_id is not None,
    )
    if verdict is None:
        bal.outliers.success(backend)
    elif verdict[1]:
        bal.outliers.failure(backend, verdict[0])
    else:
        backend.count_failure(verdict[0])


async def _end_failed(
    request: web.Request,
    resp: web.StreamResponse,
    bal: Balancer,
    lease: Lease,
    plan: _Plan,
    content_type: str,
    *,
    timed_out: bool,
    pipe: relay.Pipe | None = None,
    chunked: bool = False,
) -> None:
    """Blame and end a stream that did not finish: the client's fault (it stalled or left), nobody's (a quiet
    MCP notification stream timed out), or the backend's (it went quiet or broke mid-stream)."""
    backend = lease.backend
    if lease.client_stalled:
        backend.count_failure("client_stalled")
    elif _client_gone(request) or (pipe is not None and pipe.outcome == relay.CLIENT_GONE):
        backend.count_failure("client_gone")
    elif _notification_stream(request, plan) and timed_out:
        backend.count_failure("idle_notifications")  # a quiet MCP GET stream is normal, not a fault
        await _end_quietly(request, resp, pipe=pipe, chunked=chunked)
    else:
        bal.outliers.failure(backend, "timeout" if timed_out else "midstream")
        await _end_broken(request, resp, content_type, pipe=pipe)


def _notification_stream(request: web.Request, plan: _Plan) -> bool:
    """An MCP GET stream: the server speaks only when it has something to say, so silence is normal."""
    return plan.mcp and request.method == "GET"


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


async def _end_quietly(
    request: web.Request, resp: web.StreamResponse, *, pipe: relay.Pipe | None = None, chunked: bool = False
) -> None:
    """End a stream that did nothing wrong (a quiet notification stream): a clean end; the client reconnects.

    On the protocol path (`pipe`) only a chunked body between chunks can end cleanly (its last chunk is
    written here); otherwise the connection is closed, which the client also reads as the stream's end.
    """
    try:
        if pipe is not None:
            if chunked and pipe.between_chunks and request.transport is not None and resp.prepared:
                request.transport.write(b"0\r\n\r\n")
                await resp.write_eof()
                return
        elif resp.prepared:
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


class _StreamedBody:
    """A request body too large for the retry buffer: the buffered head, then the rest as it arrives."""

    def __init__(self, head: list[bytes], request: web.Request, reader: _BodyReader) -> None:
        self.head = head
        self.request = request
        self.reader = reader
        self.started = False
        self.fault: str | None = None
        """"too_large" or "timeout" when the client's body failed the attempt (the client's fault)."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.started = True
        for piece in self.head:
            yield piece
        while True:
            try:
                piece = await self.reader.next()
            except BodyTooLarge:
                self.fault = "too_large"
                raise
            except BodyTimeout:
                self.fault = "timeout"
                raise
            if not piece:
                return
            yield piece


class _BodyReader:
    """Reads a request body under its limits: size, a whole-body deadline and a longest pause."""

    def __init__(self, request: web.Request, bal: Balancer) -> None:
        config = bal.config
        self.content = request.content
        self.limit_bytes = config.max_body_bytes
        self.idle_s = config.body_idle_timeout_s
        self.deadline_s = asyncio.get_running_loop().time() + config.body_timeout_s
        self.seen_bytes = 0

    async def next(self) -> bytes:
        """The next piece (b"" at the end). Raises BodyTooLarge or BodyTimeout."""
        wait_s = min(self.idle_s, self.deadline_s - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                piece = await self.content.readany()
        except TimeoutError as exc:
            raise BodyTimeout from exc
        self.seen_bytes += len(piece)
        if self.seen_bytes > self.limit_bytes:
            raise BodyTooLarge
        return piece


async def _read_body(request: web.Request, bal: Balancer) -> bytes | _StreamedBody | None:
    """The whole body if it fits the retry buffer, else a streamed body; None when there is none."""
    if not request.body_exists:
        return None
    reader = _BodyReader(request, bal)
    pieces: list[bytes] = []
    while reader.seen_bytes <= bal.config.retry_buffer_bytes:
        piece = await reader.next()
        if not piece:
            return b"".join(pieces)
        pieces.append(piece)
    return _StreamedBody(pieces, request, reader)
