"""WebSocket relay: the upgrade is checked, the backend connected first, then frames flow both ways.

The backend handshake happens before we accept the client's, so a refused or failing backend can still be
retried elsewhere or answered with a plain 502; the client never sees an accepted socket that goes nowhere. The
subprotocol the backend chose is the one we accept. Text, binary, ping/pong (each side answers its own pings)
and close frames are relayed; the close code and reason one side sends are what the other side gets. The stream
holds its lease until both directions are done.

A malformed upgrade (missing or bad `Sec-WebSocket-Key`, wrong version, not a GET) gets 400 with a JSON body.

What this module does not do: inspect messages (no JSON-RPC error counting on WebSockets) or compress.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from balancer.backends import Backend
from balancer.errors import NoBackendError
from balancer.runtime import Balancer

WS_HEADERS_NOT_FORWARDED = frozenset(
    {
        "connection",
        "upgrade",
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "content-length",
        "transfer-encoding",
        "keep-alive",
        "te",
    }
)
"""Handshake headers each hop makes for itself; everything else (auth, cookies, custom) is forwarded."""

CLOSE_WAIT_S = 5.0
"""How long the second direction gets to finish the close handshake after the first one closed."""


async def relay(request: web.Request, bal: Balancer) -> web.StreamResponse:
    """Accept the client's WebSocket once the backend accepted ours, then relay until either side closes."""
    from balancer import proxy  # the error helper lives with the HTTP relay

    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    server = web.WebSocketResponse(protocols=protocols, autoclose=False, max_msg_size=0)
    ready = server.can_prepare(request)
    if request.method != "GET" or not ready.ok:
        return proxy.error_response(
            400, "malformed WebSocket upgrade: needs GET with a valid Sec-WebSocket-Key and version 13"
        )
    headers = {k: v for k, v in request.headers.items() if k.lower() not in WS_HEADERS_NOT_FORWARDED}
    headers["X-Forwarded-For"] = request.remote or ""
    headers["X-Forwarded-Proto"] = request.scheme
    assert bal.client is not None, "Balancer.start() was not awaited"
    try:
        lease = await bal.place()
    except NoBackendError as exc:
        return proxy.error_response(503, str(exc), headers={"Retry-After": str(proxy.RETRY_AFTER_S)})
    try:
        backend = lease.backend
        url = URL(f"{bal.ws_scheme}://{backend.address}{request.raw_path}", encoded=True)
        try:
            async with asyncio.timeout(bal.config.first_byte_timeout_s):
                upstream = await bal.client.ws_connect(
                    url, headers=headers, protocols=protocols, autoclose=False, max_msg_size=0, compress=0
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            bal.outliers.failure(
                backend, "connect" if isinstance(exc, aiohttp.ClientConnectorError) else "reset"
            )
            return proxy.error_response(502, f"backend {backend.address} refused the WebSocket: {exc!r}")
        try:
            server = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else [], autoclose=False, max_msg_size=0
            )
            await server.prepare(request)
            pumps = (
                asyncio.create_task(_pump(server, upstream)),
                asyncio.create_task(_pump(upstream, server)),
            )
            outcome = _Outcome(request, bal, backend)
            for pump in pumps:
                # Counted from the pumps: aiohttp may cancel this handler the moment the client hangs up.
                pump.add_done_callback(outcome.record)
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                # The other direction finishes the close handshake (or is cut if it hangs).
                await asyncio.wait(pumps, timeout=CLOSE_WAIT_S)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            await upstream.close()
            if not server.closed and server.prepared:
                with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
                    await server.close(code=WSCloseCode.GOING_AWAY)
        return server
    finally:
        lease.release()


class _Outcome:
    """Records how the socket ended, once: the first pump to finish decides."""

    def __init__(self, request: web.Request, bal: Balancer, backend: Backend) -> None:
        self.request = request
        self.bal = bal
        self.backend = backend
        self.done = False

    def record(self, pump: asyncio.Task[None]) -> None:
        if self.done or pump.cancelled():
            return
        self.done = True
        if pump.exception() is None:
            self.backend.completed += 1
            self.bal.outliers.success(self.backend)
        elif self.request.transport is not None and not self.request.transport.is_closing():
            self.bal.outliers.failure(self.backend, "midstream")
        else:
            self.backend.count_failure("client_gone")


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    """Copy messages from source to sink until source closes; pass its close code and reason on."""
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            await sink.close(code=msg.data, message=(msg.extra or "").encode())
            return
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            if not sink.closed:
                await sink.close(code=source.close_code or WSCloseCode.GOING_AWAY)
            return
