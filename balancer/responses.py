"""What the balancer itself answers: JSON error bodies that say what happened but never echo what it saw.

Every answer the balancer makes (rather than relays) is `error_response`: a status and a short JSON body
`{"error": {"code", "message", "type"}}`. Messages sent to clients are fixed sentences chosen by the caller;
details (backend addresses, exception text, raw bytes) go to the log only, through `redact`, which masks
credentials a detail can carry: `Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie`, API-key
headers, bearer tokens and `token=`/`key=` parameters. A security review found 502 bodies that echoed
`repr(exc)`, including the client's `Authorization` and `Cookie` headers and raw backend bytes.

Both the HTTP relay (proxy.py) and the WebSocket relay (websockets.py) answer through here, so neither needs
to import the other.

What this module does not do: relay, choose a status (the callers do), or log on its own.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

RETRY_AFTER_S: Final = 5
"""Retry-After on 503: about the time a queued stream waits, short enough that clients come back soon."""

SECRET_HEADERS: Final = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
)
"""Header names whose values never reach a log line or an answer."""

_HEADER_VALUE: Final = re.compile(
    r"(?i)(['\"]?(?:" + "|".join(re.escape(h) for h in SECRET_HEADERS) + r")['\"]?\s*[:=,]\s*['\"]?)"
    r"([^'\"\r\n]*)"
)
_BEARER: Final = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_PARAM: Final = re.compile(r"(?i)\b((?:access_)?token|api_key|key|secret|password)=([^&\s'\"]+)")
REDACTED: Final = "<redacted>"


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON error body every balancer-made answer carries (`message` must hold nothing the client sent)."""
    body = {"error": {"code": status, "message": message, "type": "balancer_error"}}
    return web.json_response(body, status=status, headers=headers)


def unavailable(message: str, *, retry_after_s: float = RETRY_AFTER_S) -> web.Response:
    """503 with Retry-After (whole seconds, at least 1)."""
    return error_response(503, message, headers={"Retry-After": str(max(1, round(retry_after_s)))})


def redact(text: str) -> str:
    """`text` with credentials masked: secret header values, bearer/basic tokens, token-like parameters."""
    text = _HEADER_VALUE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


def describe(exc: BaseException) -> str:
    """An exception as one redacted log-ready phrase (type and message, never the request it carried)."""
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}"[:500])
