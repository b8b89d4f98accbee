"""The gateway endpoint picker: the Gateway API Inference Extension's Endpoint Picker Protocol over Envoy ext_proc.

Behind a user's gateway (Envoy, or any gateway speaking the GIE protocol) the gateway carries the bytes and asks
this service, once per HTTP request, which pod should serve it. The choice is made by the same `runtime.Balancer`
as `forestall balancer`'s (picking, leases, sessions, warm-up, drain, ejection, admission queue): this module only
translates between ext_proc messages and that core, so the two data planes cannot drift apart.

The protocol (GIE docs/proposals/004-endpoint-picker-protocol), per HTTP request, one bidirectional gRPC stream:

- request headers in -> the pick out: header `x-gateway-destination-endpoint: ip:port[,ip:port...]` and the same
  value in dynamic metadata `envoy.lb` / `x-gateway-destination-endpoint`, with `clear_route_cache`. The first
  address is the leased pick, the others are fallbacks (the next least-loaded backends) that the gateway tries in
  order when a retry is needed (Envoy's `override_host` load-balancing policy does exactly that). A subset hint in
  the request's metadata `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset` restricts the choice;
  no eligible backend in it -> ImmediateResponse 503.
- Errors are ImmediateResponses with the balancer's JSON error body: 503 + Retry-After when every backend is full
  (after the admission queue's wait) or none is eligible, 404 for an unknown or orphaned MCP session.
- response headers in: the status, `Mcp-Session-Id` (sessions are learned and ended as in the proxy) and the
  endpoint that really served it (`envoy.lb` / `x-gateway-destination-endpoint-served`, set by the gateway): when
  that is not the pick, every address listed before it failed before answering (counted as `connect` failures,
  which feed ejection) and the lease moves to the one that serves.

Processing modes (the filter config in the gateway overlay and tests/integration/test_gateway_envoy.py):
`request_header_mode: SEND`, `response_header_mode: SEND`, `response_trailer_mode: SEND`, both body modes `NONE`,
`allow_mode_override: true`. Per request the picker raises a body mode only when it needs the bytes:

- request body `BUFFERED`, only for a POST that looks like MCP (Accept names text/event-stream and JSON) and
  carries neither `Mcp-Session-Id` nor `Mcp-Method`: a legacy client's `initialize` is recognised in the body and
  placed under the bounded-load rule for new sessions. The pick is then answered in the body response.
- response body `BUFFERED_PARTIAL` for JSON answers (MCP responses, non-streaming completions; one message with up
  to the gateway's buffer limit), and `STREAMED` for SSE answers to MCP requests (a few events each): their first
  and last chunk go through `health.response_error` exactly as the proxy inspects them (JSON-RPC errors and
  `isError` in a 200, SSE error events).
- LLM token streams (SSE to a non-MCP request) stay `NONE`: the picker is never on the per-chunk path. Their body
  errors are not seen here; a backend that dies shows up as `connect` failures of the requests that follow.

End of stream, and why that signal: a lease must be held until the HTTP stream really ends. With response
trailers set to `SEND` the gateway keeps the ext_proc stream open after the response headers (trailers might still
come) and closes it when the HTTP stream is done: after the last byte went to the client, when the client went
away, or when the backend died mid-stream (verified against Envoy 1.40 in the tests, each case). That close is
the only signal ext_proc gives for every ending without sending the body: response-body `end_of_stream` needs
`STREAMED` (a message per chunk), and trailers are only sent when the backend sends some (HTTP/1 backends
do not). With trailers `SKIP` Envoy ends the ext_proc stream right after the response headers, which would end
leases at the first byte: the stream count would become a request count. The lease is therefore released in the
`finally` of the per-stream handler, whichever way the stream ends (closed, cancelled, reset).

Cost per request (what the gateway and this process exchange): request headers + response headers, two round
trips; plus one for a buffered MCP request body, one for a JSON response body, one per chunk of an MCP SSE answer.

What this module does not do: carry bytes, retry (the gateway does, over the fallback list), discover backends
(endpointslices.py, inferencepools.py), or serve /signals and /metrics (app.py's admin app, reused as it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from balancer import health as health_mod
from balancer.backends import Backend, Lease
from balancer.errors import NoBackendError
from balancer.runtime import Balancer

log = logging.getLogger(__name__)

DESTINATION: Final = "x-gateway-destination-endpoint"
"""Header and `envoy.lb` metadata key naming the chosen endpoints (GIE protocol)."""
SERVED: Final = "x-gateway-destination-endpoint-served"
"""`envoy.lb` metadata key the gateway sets to the endpoint that really served the request."""
SUBSET: Final = "x-gateway-destination-endpoint-subset"
"""Key of the optional subset hint the gateway sends, under `SUBSET_NAMESPACE`."""
LB_NAMESPACE: Final = "envoy.lb"
SUBSET_NAMESPACE: Final = "envoy.lb.subset_hint"

SESSION_HEADER: Final = "mcp-session-id"
METHOD_HEADER: Final = "mcp-method"
NAME_HEADER: Final = "mcp-name"
"""Stateless MCP (2026-07-28 revision): requests route by method, and by method and name with bounded load."""

FALLBACKS: Final = 2
"""Fallback endpoints after the pick: enough for Envoy's default of up to 2 retries, each on another backend."""

INITIALIZE: Final = b'"method":"initialize"'
INITIALIZE_SCAN_BYTES: Final = 4096
"""A legacy MCP `initialize` names itself in the first bytes of a compact JSON-RPC body (as proxy.py scans)."""

ROUTE_CACHE_MAX: Final = 4096
"""Cached pick answers (one per ordered endpoint list seen); cleared when it grows past this (pool churn)."""

RETRY_AFTER_S: Final = 5
"""Retry-After on 503, as the proxy answers."""

GRPC_SERVICES: Final = ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")
"""gRPC health services the protocol asks for; readiness and the ext_proc service follow /readyz."""

_WANTED: Final = frozenset(
    {":method", ":status", "accept", "content-type", SESSION_HEADER, METHOD_HEADER, NAME_HEADER}
)

_Mode = processing_mode_pb2.ProcessingMode


def _mode(**body: int) -> processing_mode_pb2.ProcessingMode:
    # A mode override replaces the whole mode: keep headers and trailers SEND so the stream stays open to the end.
    return _Mode(
        request_header_mode=_Mode.SEND,
        response_header_mode=_Mode.SEND,
        response_trailer_mode=_Mode.SEND,
        request_trailer_mode=_Mode.SKIP,
        **body,
    )


REQUEST_BODY_MODE: Final = _mode(request_body_mode=_Mode.BUFFERED)
JSON_BODY_MODE: Final = _mode(response_body_mode=_Mode.BUFFERED_PARTIAL)
SSE_BODY_MODE: Final = _mode(response_body_mode=_Mode.STREAMED)

_CONTINUE_HEADERS: Final = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_BODY: Final = pb.ProcessingResponse(response_body=pb.BodyResponse())
_CONTINUE_REQUEST_BODY: Final = pb.ProcessingResponse(request_body=pb.BodyResponse())
_CONTINUE_RESPONSE_TRAILERS: Final = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
_CONTINUE_REQUEST_TRAILERS: Final = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_ASK_REQUEST_BODY: Final = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(), mode_override=REQUEST_BODY_MODE
)


@dataclass(frozen=True)
class _Route:
    """What routing needs from the request, kept while its body is fetched."""

    allowed: frozenset[str] | None
    affinity_key: str | None
    method: str | None


class _Exchange:
    """One HTTP request as the picker follows it."""

    __slots__ = (
        "body",
        "content_type",
        "first",
        "inspect",
        "last",
        "lease",
        "mcp",
        "request_method",
        "route",
        "session_id",
        "start_s",
        "status",
        "tried",
    )

    def __init__(self) -> None:
        self.lease: Lease | None = None
        self.tried: list[Backend] = []
        self.session_id: str | None = None
        self.request_method = ""
        self.mcp = False
        self.route: _Route | None = None
        self.body = b""
        self.start_s = 0.0
        self.status = 0
        self.content_type = ""
        self.inspect = False
        self.first = b""
        self.last = b""


class Picker(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The ext_proc service: one `Process` stream per HTTP request, answered from the shared Balancer."""

    def __init__(self, bal: Balancer, *, fallbacks: int = FALLBACKS) -> None:
        self.bal = bal
        self.fallbacks = fallbacks
        self._routes: dict[tuple[str, tuple[str, ...]], pb.ProcessingResponse] = {}
        """Answers naming the same endpoints are the same message: built once, reused (a few per backend)."""

    async def Process(  # the gRPC method name
        self, requests: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> None:
        """Answer each message of one request's stream; release its lease when the stream ends, however."""
        ex = _Exchange()
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            while (req := await read()) is not eof:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    answer = await self._request_headers(ex, req)
                elif kind == "response_headers":
                    answer = self._response_headers(ex, req)
                elif kind == "response_body":
                    answer = self._response_body(ex, req.response_body)
                elif kind == "request_body":
                    answer = await self._request_body(ex, req.request_body)
                elif kind == "response_trailers":
                    answer = _CONTINUE_RESPONSE_TRAILERS
                else:
                    answer = _CONTINUE_REQUEST_TRAILERS
                await write(answer)
                if answer.HasField("immediate_response"):
                    return
        finally:
            self._end(ex)

    async def _request_headers(self, ex: _Exchange, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        bal = self.bal
        headers = _headers(req.request_headers.headers.headers, self._wanted)
        ex.request_method = headers.get(":method", "")
        allowed = _subset(req.metadata_context)
        session_id = headers.get(SESSION_HEADER)
        accept = headers.get("accept", "")
        # MCP Streamable HTTP clients must accept both; an SSE-only Accept is an ordinary token stream.
        ex.mcp = (
            session_id is not None
            or METHOD_HEADER in headers
            or ("text/event-stream" in accept and "application/json" in accept)
        )
        if session_id is not None:
            ex.session_id = session_id
            pinned = bal.sessions.lookup(session_id)
            if pinned is None or (allowed is not None and pinned.address not in allowed):
                return _immediate(
                    404,
                    f"MCP session {session_id!r} is unknown or its backend is gone; initialize a new session",
                )
            ex.lease = bal.pool.lease(pinned)
            ex.tried = [pinned]
            ex.start_s = bal.clock.monotonic()
            return self._routed(ex.tried, phase="request_headers")
        method = headers.get(METHOD_HEADER)
        name = headers.get(NAME_HEADER)
        affinity = f"{method}\n{name}" if method is not None and name is not None else self._affinity(headers)
        route = _Route(allowed=allowed, affinity_key=affinity, method=method)
        if (
            method is None
            and ex.request_method == "POST"
            and ex.mcp
            and not req.request_headers.end_of_stream
        ):
            ex.route = route
            return _ASK_REQUEST_BODY
        return await self._place(ex, route, new_session=method == "initialize", phase="request_headers")

    async def _request_body(self, ex: _Exchange, body: pb.HttpBody) -> pb.ProcessingResponse:
        if ex.route is None or ex.lease is not None:
            return _CONTINUE_REQUEST_BODY
        ex.body += body.body
        if not body.end_of_stream:
            return _CONTINUE_REQUEST_BODY
        new_session = INITIALIZE in ex.body[:INITIALIZE_SCAN_BYTES]
        ex.body = b""
        return await self._place(ex, ex.route, new_session=new_session, phase="request_body")

    async def _place(
        self, ex: _Exchange, route: _Route, *, new_session: bool, phase: str
    ) -> pb.ProcessingResponse:
        bal = self.bal
        exclude: frozenset[str] = frozenset()
        if route.allowed is not None:
            exclude = frozenset(a for a in bal.pool.backends if a not in route.allowed)
            if not any(b.present for a, b in bal.pool.backends.items() if a in route.allowed):
                return _immediate(503, "no backend of the gateway's endpoint subset is known to the picker")
        try:
            lease = await bal.place(
                exclude=exclude, affinity_key=route.affinity_key, method=route.method, new_session=new_session
            )
        except NoBackendError as exc:
            return _immediate(503, str(exc), retry_after=True)
        ex.lease = lease
        ex.start_s = bal.clock.monotonic()
        tried = [lease.backend]
        skip = set(exclude)
        skip.add(lease.backend.address)
        for _ in range(self.fallbacks):
            fallback = bal.choose(exclude=frozenset(skip), method=route.method)
            if fallback is None:
                break
            tried.append(fallback)
            skip.add(fallback.address)
        ex.tried = tried
        return self._routed(tried, phase=phase)

    def _response_headers(self, ex: _Exchange, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        bal = self.bal
        headers = _headers(req.response_headers.headers.headers, _WANTED)
        try:
            ex.status = int(headers.get(":status", "0"))
        except ValueError:
            ex.status = 0
        lease = ex.lease
        if lease is None:
            return _CONTINUE_HEADERS
        served = _metadata_value(req.metadata_context, LB_NAMESPACE, SERVED)
        if served and served != lease.backend.address:
            lease = ex.lease = self._move(ex, lease, served)
            if lease is None:
                return _CONTINUE_HEADERS
        backend = lease.backend
        now_s = bal.clock.monotonic()
        backend.observe_ttfb(now_s - ex.start_s, now_s)
        learned = headers.get(SESSION_HEADER)
        if learned is not None and ex.session_id is None and ex.status < 300:
            bal.sessions.bind(learned, backend)
        elif ex.session_id is not None and (
            ex.status == 404 or (ex.request_method == "DELETE" and ex.status < 300)
        ):
            bal.sessions.end(ex.session_id)
        if ex.status != 200 or req.response_headers.end_of_stream:
            return _CONTINUE_HEADERS
        ex.content_type = headers.get("content-type", "")
        if "json" in ex.content_type:
            ex.inspect = True
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(), mode_override=JSON_BODY_MODE)
        if ex.mcp and "event-stream" in ex.content_type:
            ex.inspect = True
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(), mode_override=SSE_BODY_MODE)
        return _CONTINUE_HEADERS

    def _move(self, ex: _Exchange, lease: Lease, served: str) -> Lease | None:
        """The gateway served from another listed endpoint: the ones before it failed; the lease follows it."""
        bal = self.bal
        for backend in ex.tried:
            if backend.address == served:
                break
            bal.outliers.failure(backend, "connect")
        lease.release()
        target = bal.pool.backends.get(served)
        return bal.pool.lease(target) if target is not None else None

    def _response_body(self, ex: _Exchange, body: pb.HttpBody) -> pb.ProcessingResponse:
        chunk = body.body
        if chunk:
            if not ex.first:
                ex.first = chunk
            ex.last = chunk
        return _CONTINUE_BODY

    def _end(self, ex: _Exchange) -> None:
        """The HTTP stream is over: release the lease and give the backend its verdict."""
        lease = ex.lease
        if lease is None:
            return
        ex.lease = None
        backend = lease.backend
        lease.release()
        status = ex.status
        if status == 0:
            backend.count_failure("cancelled")
            return
        backend.completed += 1
        if status >= 500:
            self.bal.outliers.failure(backend, f"status_{status}")
            return
        hidden = None
        if ex.inspect and status == 200:
            last = ex.last if ex.last is not ex.first else ex.first
            hidden = health_mod.response_error(ex.first, last, content_type=ex.content_type)
        if hidden is not None:
            self.bal.outliers.failure(backend, hidden)
        else:
            self.bal.outliers.success(backend)

    @functools.cached_property
    def _wanted(self) -> frozenset[str]:
        header = self.bal.config.affinity_header
        extra = {header.lower()} if header else set()
        if self.bal.config.affinity_cookie:
            extra.add("cookie")
        return _WANTED | extra

    def _routed(self, backends: list[Backend], *, phase: str) -> pb.ProcessingResponse:
        key = (phase, tuple(b.address for b in backends))
        answer = self._routes.get(key)
        if answer is None:
            if len(self._routes) > ROUTE_CACHE_MAX:
                self._routes.clear()
            answer = self._routes[key] = _routed(key[1], phase=phase)
        return answer

    def _affinity(self, headers: dict[str, str]) -> str | None:
        config = self.bal.config
        if config.affinity_header is not None:
            value = headers.get(config.affinity_header.lower())
            if value:
                return value
        if config.affinity_cookie is not None and "cookie" in headers:
            from http.cookies import CookieError, SimpleCookie

            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(CookieError):
                jar.load(headers["cookie"])
            morsel = jar.get(config.affinity_cookie)
            if morsel is not None and morsel.value:
                return morsel.value
        return None


def _headers(items: Iterable[base_pb2.HeaderValue], wanted: frozenset[str]) -> dict[str, str]:
    """The wanted headers (keys arrive lower-cased; values in raw_value, or value from older gateways)."""
    out: dict[str, str] = {}
    for item in items:
        key = item.key
        if key in wanted:
            raw = item.raw_value
            out[key] = raw.decode("latin-1") if raw else item.value
    return out


def _metadata_value(metadata: base_pb2.Metadata, namespace: str, key: str) -> str | None:
    fields = metadata.filter_metadata.get(namespace)
    if fields is None:
        return None
    value = fields.fields.get(key)
    if value is None:
        return None
    if value.HasField("string_value"):
        return str(value.string_value)
    return None


def _subset(metadata: base_pb2.Metadata) -> frozenset[str] | None:
    """The gateway's subset hint: a list of `ip:port` (or one comma-separated string), or None when absent."""
    fields = metadata.filter_metadata.get(SUBSET_NAMESPACE)
    if fields is None or SUBSET not in fields.fields:
        return None
    value = fields.fields[SUBSET]
    items: list[str] = []
    if value.HasField("list_value"):
        items = [v.string_value for v in value.list_value.values if v.HasField("string_value")]
    elif value.HasField("string_value"):
        items = [value.string_value]
    return frozenset(part.strip() for item in items for part in item.split(",") if part.strip())


def _routed(addresses: tuple[str, ...], *, phase: str) -> pb.ProcessingResponse:
    """The pick as the protocol wants it: the header and the `envoy.lb` metadata, the same value in both."""
    value = ",".join(addresses)
    common = pb.CommonResponse(
        clear_route_cache=True,
        header_mutation=pb.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DESTINATION, raw_value=value.encode())
                )
            ]
        ),
    )
    metadata = struct_pb2.Struct()
    metadata.fields[LB_NAMESPACE].struct_value.fields[DESTINATION].string_value = value
    if phase == "request_body":
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata)
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
    )


def _immediate(status: int, message: str, *, retry_after: bool = False) -> pb.ProcessingResponse:
    """A locally generated answer carrying the balancer's JSON error body."""
    body = json.dumps({"error": {"code": status, "message": message, "type": "balancer_error"}}).encode()
    headers = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")
        )
    ]
    if retry_after:
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="retry-after", raw_value=str(RETRY_AFTER_S).encode())
            )
        )
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=body,
            details="forestall_picker",
        )
    )


@dataclass
class GrpcServed:
    """The running ext_proc server; `close()` stops it, letting open streams end for `grace_s`."""

    server: Any
    port: int
    health: Any
    readiness: asyncio.Task[None]

    async def close(self, grace_s: float = 5.0) -> None:
        self.readiness.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.readiness
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def serve_grpc(bal: Balancer, listen: str, *, fallbacks: int = FALLBACKS) -> GrpcServed:
    """Serve ext_proc and gRPC health on `listen` (host:port; port 0 picks one, see `GrpcServed.port`)."""
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100_000)])
    pb_grpc.add_ExternalProcessorServicer_to_server(Picker(bal, fallbacks=fallbacks), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port(listen)
    await server.start()
    await checker.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    task = asyncio.create_task(_track_readiness(bal, checker), name="picker-readiness")
    return GrpcServed(server=server, port=port, health=checker, readiness=task)


async def _track_readiness(bal: Balancer, checker: Any) -> None:
    """Readiness (and the ext_proc service's health) is SERVING while some backend can take a stream."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    last = None
    while True:
        now = bal.clock.monotonic()
        ready = any(b.state(now) in ("ready", "warming") for b in bal.pool.present())
        if ready != last:
            for service in GRPC_SERVICES:
                if service != "liveness":
                    await checker.set(service, serving if ready else not_serving)
            last = ready
        await bal.clock.sleep(1.0)
