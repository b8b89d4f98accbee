"""What the client listener accepts and what it forwards: routes, methods, header bytes, header hygiene.

`refuse(request, config)` is the first thing every proxied request meets (HTTP and WebSocket alike). It
answers, instead of the backend:
- 405 for TRACE and CONNECT (a proxy that relays TRACE reflects the client's credentials back; CONNECT would
  make it an open tunnel);
- 400 for a path with `.` or `..` segments (after percent-decoding), so `/v1/../metrics` cannot reach a
  backend page outside the configured routes;
- 404 for a path outside the configured routes (`routes`, plus `mcp_path`), so a backend's `/metrics` or
  admin pages are not public;
- 400 for a header whose name or value carries bytes HTTP does not allow (control characters, DEL, or
  bytes that are not UTF-8). aiohttp's parser already refuses most control bytes; what it lets through as
  surrogate escapes would otherwise be re-encoded or dropped silently on the way to the backend.

`target(request)` is the origin-form path and query sent to the backend, also for an absolute-form request
line (`GET http://host/v1/x HTTP/1.1`), whose authority is ignored (the backend is ours to choose).

`forward_headers` and `websocket_headers` apply the same hygiene to both kinds of request: hop-by-hop headers
and those named in `Connection` are dropped, `Expect` is dropped (the balancer answers `100-continue` itself,
aiohttp's default expect handler, and sends the backend the whole body), `Host` is the backend's, and the
X-Forwarded-* headers are rebuilt rather than trusted.

What this module does not do: read bodies (proxy.py) or answer anything but these refusals.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from balancer import responses
from balancer.config import BalancerConfig

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

NOT_FORWARDED: Final = HOP_BY_HOP | {
    "host",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}
"""Request headers we replace or handle: Host is the backend's, Expect is answered here, X-Forwarded-* rebuilt."""

WS_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "content-length",
    }
)
"""WebSocket handshake headers each hop makes for itself (the subprotocol list is passed separately)."""

REFUSED_METHODS: Final = frozenset({"TRACE", "CONNECT"})

_BAD_HEADER_CHARS: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\udc80-\udcff]")
"""Control characters other than HTAB, DEL, and the surrogate escapes aiohttp uses for non-UTF-8 bytes."""
_TOKEN: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
"""RFC 9110 token: what a header name may be."""


def refuse(request: web.Request, config: BalancerConfig) -> web.Response | None:
    """The balancer's own answer when the request must not reach a backend, else None."""
    if request.method in REFUSED_METHODS:
        return responses.error_response(
            405, f"method {request.method} is not proxied", headers={"Allow": "GET, POST, DELETE"}
        )
    path = request.path
    if any(segment in (".", "..") for segment in path.split("/")):
        return responses.error_response(400, "the path must not contain '.' or '..' segments")
    if not routed(path, config):
        return responses.error_response(404, "no route for this path")
    for name, value in request.headers.items():
        if not _TOKEN.match(name) or _BAD_HEADER_CHARS.search(value):
            return responses.error_response(400, "a request header carries bytes HTTP does not allow")
    return None


def routed(path: str, config: BalancerConfig) -> bool:
    """Whether `path` is under a configured route or is the MCP endpoint."""
    for prefix in (*config.routes, config.mcp_path):
        if prefix.endswith("/"):
            if path.startswith(prefix):
                return True
        elif path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def is_mcp(request: web.Request, config: BalancerConfig) -> bool:
    path = request.path
    return path == config.mcp_path or path.startswith(config.mcp_path.rstrip("/") + "/")


def target(request: web.Request) -> str:
    """Origin-form path and query for the backend (an absolute-form request line's authority is dropped)."""
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    return request.rel_url.raw_path_qs


def forward_headers(request: web.Request, *, keep_length: bool) -> CIMultiDict[str]:
    """Headers for the backend: hop-by-hop and Connection-named ones dropped, X-Forwarded-* rebuilt.

    `keep_length` keeps Content-Length (a streamed body is sent with the client's framing); a buffered body
    gets its length from the bytes we send.
    """
    drop = NOT_FORWARDED | _connection_tokens(request)
    if not keep_length:
        drop = drop | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
    _add_forwarded(request, out)
    return out


def websocket_headers(request: web.Request) -> CIMultiDict[str]:
    """Headers for the backend's WebSocket handshake, with the same hygiene as HTTP plus the handshake's own."""
    drop = NOT_FORWARDED | WS_HANDSHAKE | _connection_tokens(request)
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
    _add_forwarded(request, out)
    return out


def backward_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Response headers for the client: hop-by-hop and Connection-named ones dropped."""
    values = headers.getall("Connection", [])
    drop = HOP_BY_HOP | {token.strip().lower() for value in values for token in value.split(",")}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _connection_tokens(request: web.Request) -> set[str]:
    values = request.headers.getall("Connection", [])
    return {token.strip().lower() for value in values for token in value.split(",")}


def _add_forwarded(request: web.Request, out: CIMultiDict[str]) -> None:
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    out["X-Forwarded-Host"] = request.host
