"""The client listener's connection limits: caps, a header deadline, and quiet logging of malformed requests.

aiohttp's server has a keep-alive timeout but no deadline on the request line and headers and no connection
cap, so a client trickling header bytes (slowloris) held a connection and a descriptor forever, and nothing
bounded how many it opened. `GuardedRunner` serves the app with `GuardedServer`, whose connections
(`_GuardedHandler`, a subclass of aiohttp's RequestHandler; it reads the handler's private request counters,
which is why aiohttp is pinned by minor version in tests, not in production) add:
- a total cap (`max_connections`) and a per-peer-address cap (`max_connections_per_ip`): a connection over
  either gets `503` with `Retry-After` and is closed before any request is read;
- a header deadline (`header_timeout_s`): from a connection's start, and from the first byte of each later
  request, its line and headers must be complete in time, else `408` and close. Time spent handling a request
  (streaming a response, reading a body: proxy.py has its own body deadlines) does not count;
- keep-alive idle closing (`keepalive_timeout_s`, aiohttp's own, passed through).

Malformed requests (bad request line, bad header bytes) are answered 400 by aiohttp; it logged each with a
traceback, which lets any client fill the log, and its answer echoed the offending request line (a Cookie
or Authorization line among them). They are logged here as one line at INFO, redacted, and answered with a
generic JSON body.

What this module does not do: anything per request once its headers are in (proxy.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from balancer import responses
from balancer.config import BalancerConfig

log = logging.getLogger(__name__)

OVER_CAPACITY: bytes = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: 95\r\n\r\n"
    b'{"error": {"code": 503, "message": "too many connections", "type": "balancer_error"}}         '
)
"""Written raw to a connection over a cap: no request has been parsed, so no aiohttp response exists."""

HEADER_TIMEOUT: bytes = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: 95\r\n\r\n"
    b'{"error": {"code": 408, "message": "request headers too slow", "type": "balancer_error"}}     '
)


class GuardedServer(web.Server):
    """aiohttp's Server with connection caps and a header deadline on each connection."""

    def __init__(self, *args: Any, config: BalancerConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config
        self.open_total = 0
        self.open_per_ip: dict[str, int] = {}
        self.refused_total = 0

    def __call__(self) -> _GuardedHandler:
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    def admit(self, peer: str) -> bool:
        """Count one more connection from `peer`; False (nothing counted) when a cap is reached."""
        if (
            self.open_total >= self.config.max_connections
            or self.open_per_ip.get(peer, 0) >= self.config.max_connections_per_ip
        ):
            self.refused_total += 1
            return False
        self.open_total += 1
        self.open_per_ip[peer] = self.open_per_ip.get(peer, 0) + 1
        return True

    def leave(self, peer: str) -> None:
        self.open_total -= 1
        left = self.open_per_ip[peer] - 1
        if left:
            self.open_per_ip[peer] = left
        else:
            del self.open_per_ip[peer]


class _GuardedHandler(web_protocol.RequestHandler):
    """One client connection: counted against the caps, its headers under a deadline."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = manager
        self.peer: str | None = None
        self.refused = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.head_partial = False
        """Whether the pending head has begun (bytes arrived): then the client is told 408 before the close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        if not self.guard.admit(peer):
            self.refused = True
            writable = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
            writable.write(OVER_CAPACITY)
            writable.close()
            return
        self.peer = peer
        super().connection_made(transport)
        self._arm_head_timer(partial=False)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.refused:
            return
        self._cancel_head_timer()
        if self.peer is not None:
            self.guard.leave(self.peer)
            self.peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_head_timer()  # a request line and headers are complete
        elif self.head_timer is None and self._current_request is None and not self._messages:
            self._arm_head_timer(
                partial=True
            )  # bytes of a new request's head, outside any request's handling

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, with a generic JSON body: its own echoes the
        offending request bytes (a Cookie or Authorization line among them) back."""
        resp = super().handle_error(request, status, exc, message)
        if isinstance(resp, web.Response):
            text = "malformed request" if isinstance(exc, HttpProcessingError) else "internal error"
            resp.content_type = "application/json"
            resp.text = json.dumps(
                {"error": {"code": resp.status, "message": text, "type": "balancer_error"}}
            )
        return resp

    def _arm_head_timer(self, *, partial: bool) -> None:
        self._cancel_head_timer()
        self.head_partial = partial
        self.head_timer = self._loop.call_later(self.guard.config.header_timeout_s, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._current_request is not None or self._messages:
            return
        if self.head_partial or self._request_count == 0:
            transport.write(HEADER_TIMEOUT)
        transport.close()


class QuietMalformed(logging.Filter):
    """Turns aiohttp's traceback for a malformed request into one redacted INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.exc_text = None
            record.msg = "malformed request refused: %s"
            record.args = (responses.redact(f"{exc.code} {exc.message}"[:300]),)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_QUIET = QuietMalformed()


class GuardedRunner(web.AppRunner):
    """AppRunner serving its app with `GuardedServer` (caps, header deadline, keep-alive timeout)."""

    def __init__(self, app: web.Application, *, config: BalancerConfig, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=config.keepalive_timeout_s, **kwargs)
        self.config = config
        logging.getLogger("aiohttp.server").addFilter(_QUIET)  # a set: adding it again is harmless

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            config=self.config,
            **plain._kwargs,
        )
