"""WebSocket relay: the upgrade is checked, the backend connected first, then frames flow both ways.

The backend handshake happens before we accept the client's, so a refused or failing backend can still be
retried elsewhere or answered with a plain 502; the client never sees an accepted socket that goes nowhere. The
subprotocol the backend chose is the one we accept. Text, binary, ping/pong (each side answers its own pings)
and close frames are relayed; the close code and reason one side sends are what the other side gets. The stream
holds its lease until both directions are done.

A malformed upgrade (missing or bad `Sec-WebSocket-Key`, wrong version, not a GET) gets 400 with a JSON body.
The upgrade request gets the same header hygiene as any HTTP request (inbound.websocket_headers: hop-by-hop and
Connection-named headers dropped, X-Forwarded-* rebuilt, not trusted). Messages are capped both ways at
`ws_max_message_bytes` (aiohttp refuses a bigger one before buffering it whole; one 50 MiB message used to
add 111 MB of RSS): the side that sent it gets close code 1009 and is blamed, the other side 1001.

What this module does not do: inspect messages (no JSON-RPC error counting on WebSockets) or compress.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from balancer import inbound, responses
from balancer.backends import Backend
from balancer.errors import NoBackendError
from balancer.runtime import Balancer

CLOSE_WAIT_S = 5.0
"""How long the second direction gets to finish the close handshake after the first one closed."""


class MessageTooBig(Exception):
    """A side sent a message over `ws_max_message_bytes`; `by_client` says which side."""

    def __init__(self, *, by_client: bool) -> None:
        super().__init__("message too big")
        self.by_client = by_client


async def relay(request: web.Request, bal: Balancer) -> web.StreamResponse:
    """Accept the client's WebSocket once the backend accepted ours, then relay until either side closes."""
    cap = bal.config.ws_max_message_bytes
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    server = web.WebSocketResponse(protocols=protocols, autoclose=False, max_msg_size=cap)
    ready = server.can_prepare(request)
    if request.method != "GET" or not ready.ok:
        return responses.error_response(
            400, "malformed WebSocket upgrade: needs GET with a valid Sec-WebSocket-Key and version 13"
        )
    headers = inbound.websocket_headers(request)
    assert bal.client is not None, "Balancer.start() was not awaited"
    try:
        lease = await bal.place()
    except NoBackendError:
        return responses.unavailable("no backend can take the WebSocket now; retry later")
    try:
        backend = lease.backend
        url = URL(f"{bal.ws_scheme}://{backend.address}{inbound.target(request)}", encoded=True)
        try:
            async with asyncio.timeout(bal.config.first_byte_timeout_s):
                upstream = await bal.client.ws_connect(
                    url, headers=headers, protocols=protocols, autoclose=False, max_msg_size=cap, compress=0
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            bal.outliers.failure(
                backend, "connect" if isinstance(exc, aiohttp.ClientConnectorError) else "reset"
            )
            return responses.error_response(502, "the backend refused the WebSocket")
        try:
            server = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else [], autoclose=False, max_msg_size=cap
            )
            await server.prepare(request)
            pumps = (
                asyncio.create_task(_pump(server, upstream, from_client=True)),
                asyncio.create_task(_pump(upstream, server, from_client=False)),
            )
            outcome = _Outcome(request, bal, backend)
            for pump in pumps:
                # Counted from the pumps: aiohttp may cancel this handler the moment the client hangs up.
                pump.add_done_callback(outcome.record)
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for pump in done:
                    failure = None if pump.cancelled() else pump.exception()
                    if isinstance(failure, MessageTooBig):
                        other = upstream if failure.by_client else server
                        with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
                            await other.close(
                                code=WSCloseCode.GOING_AWAY, message=b"peer sent a message too big"
                            )
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
        exc = pump.exception()
        if isinstance(exc, MessageTooBig):
            if exc.by_client:
                self.backend.count_failure("client_error")
            else:
                self.bal.outliers.failure(self.backend, "message_too_big")
        elif exc is None:
            self.backend.completed += 1
            self.bal.outliers.success(self.backend)
        elif self.request.transport is not None and not self.request.transport.is_closing():
            self.bal.outliers.failure(self.backend, "midstream")
        else:
            self.backend.count_failure("client_gone")


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    *,
    from_client: bool,
) -> None:
    """Copy messages from source to sink until source closes; pass its close code and reason on.

    Raises:
        MessageTooBig: the source sent a message over the cap (aiohttp already closed it with 1009).
    """
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.ERROR and getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
            raise MessageTooBig(by_client=from_client)  # recorded first; the relay then closes the sink
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
