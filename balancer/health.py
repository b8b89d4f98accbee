"""Health: passive outlier ejection, the retry budget, and spotting failures hidden inside a 200.

Ejection is passive (no probes): every stream reports success or failure, and `consecutive_failures` failures
in a row eject the backend for `base_ejection_s`, doubled on each repeat up to `max_ejection_s`, as Envoy's
outlier detection does. A success resets the count; a backend that comes back and fails again goes out for
longer. At most `max_ejected_fraction` of the backends are out at once, so a fault in the balancer's own path
(or a bad deploy everywhere) degrades service instead of ejecting every backend.

What counts as a failure: refused or reset connections, timeouts, 5xx before the body, a backend dying
mid-stream, and errors wrapped in a 200: a JSON-RPC `error` member or `result.isError: true` in an MCP
response (JSON or SSE), and an SSE `data: {"error": ...}` event (vLLM and OpenAI end a failed stream that
way). To keep the per-chunk path bare, `response_error` looks only at the first and the last chunk of a
response, after it was relayed: errors reported there (the usual place) are caught; one in the middle of a
long stream that then carries on is not.

Who caused an error decides whether it counts (`blame`). A security review saw one client eject a backend by
calling a failing tool five times in its own MCP session, and every other session on it then lost its
backend. So on the MCP endpoint an application-level answer never counts against the backend: a tool result
with `isError`, and any JSON-RPC error inside a legacy session (the session's state is the client's own doing),
or a JSON-RPC error with a client-side code (parse error, invalid request, method not found, invalid params)
on a stateless request. What still counts there is what only a sick backend produces: transport failures,
5xx statuses, and `Internal error` (-32603) or implementation-defined server errors on stateless requests.
4xx answers are neither success nor failure. Elsewhere (the OpenAI-style routes) an error event in a 200 is
the backend's failure, as before.

Retries are bounded by a budget (`RetryBudget`), so an outage cannot multiply the load by `max_attempts`.

What this module does not do: decide whether a retry is safe (proxy.py knows whether a byte reached the
client) or read the clock for anything but the ejection deadline.
"""

from __future__ import annotations

import json
from typing import Any

from balancer.backends import Backend, Pool
from balancer.config import BalancerConfig
from contract import clock as clock_mod

INSPECT_MAX_BYTES = 64 * 1024
"""Chunks larger than this are not parsed for errors: an error report is small, a large chunk is content."""


class OutlierDetector:
    """Counts consecutive failures per backend and ejects, with growing ejection times."""

    def __init__(self, pool: Pool, config: BalancerConfig, *, clock: clock_mod.Clock) -> None:
        self.pool = pool
        self.config = config
        self.clock = clock

    def success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0

    def failure(self, backend: Backend, reason: str) -> bool:
        """Count a failure (labelled `reason`); True when this one ejected the backend."""
        backend.count_failure(reason)
        backend.consecutive_failures += 1
        now = self.clock.monotonic()
        if backend.consecutive_failures < self.config.consecutive_failures or backend.state(now) == "ejected":
            return False
        present = self.pool.present()
        ejected = sum(1 for b in present if b.state(now) == "ejected")
        if (ejected + 1) > self.config.max_ejected_fraction * len(present):
            return False
        ejection_s = min(self.config.base_ejection_s * 2**backend.ejections, self.config.max_ejection_s)
        backend.ejections += 1
        backend.ejected_until_s = now + ejection_s
        backend.consecutive_failures = 0
        return True


class RetryBudget:
    """Retries allowed: `min` always, plus `ratio` per request seen (a token bucket filled by requests)."""

    def __init__(self, *, ratio: float, min_retries: int) -> None:
        self.ratio = ratio
        self.cap = max(float(min_retries), 1.0) * 10
        self.tokens = float(min_retries)

    def on_request(self) -> None:
        self.tokens = min(self.tokens + self.ratio, self.cap)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def response_error(first: bytes, last: bytes, *, content_type: str) -> str | None:
    """The failure reason hidden in a 200's first/last chunk, or None: `jsonrpc_error`, `json_error`, `sse_error`."""
    if "json" in content_type:
        if len(first) > INSPECT_MAX_BYTES:
            return None
        reason = _json_error(_loads(first))
        return "json_error" if reason == "error" else reason
    if "event-stream" in content_type:
        for chunk in (first, last) if last is not first else (first,):
            if len(chunk) > INSPECT_MAX_BYTES or b"rror" not in chunk:
                continue
            for line in chunk.split(b"\n"):
                if line.startswith(b"data:"):
                    reason = _json_error(_loads(line[5:]))
                    if reason is not None:
                        return "sse_error" if reason == "error" else reason
    return None


CLIENT_JSONRPC_CODES = frozenset({-32700, -32600, -32601, -32602})
"""JSON-RPC 2.0 codes for errors in what the client sent: parse error, invalid request, unknown method, bad
params."""

CLIENT_ERROR = "client_error"
"""Reason recorded (in `streams_failed_total`, never in ejection) for an error the client caused."""


def blame(
    first: bytes, last: bytes, *, status: int, content_type: str, mcp: bool, in_session: bool
) -> tuple[str, bool] | None:
    """Who a finished response's error belongs to: None (no error), else (reason, backend_at_fault).

    Args:
        first, last: the response's first and last chunk (what `response_error` inspects).
        mcp: the request went to the MCP endpoint.
        in_session: it carried a legacy MCP session id.
    """
    if status >= 500:
        return f"status_{status}", True
    if 400 <= status < 500:
        return CLIENT_ERROR, False
    if status != 200:
        return None
    reason = response_error(first, last, content_type=content_type)
    if reason is None or not mcp:
        return (reason, True) if reason is not None else None
    if in_session:
        return CLIENT_ERROR, False
    codes = _jsonrpc_codes(first, last, content_type=content_type)
    if not codes or all(code is None or code in CLIENT_JSONRPC_CODES for code in codes):
        return CLIENT_ERROR, False
    return reason, True


def _jsonrpc_codes(first: bytes, last: bytes, *, content_type: str) -> list[int | None]:
    """Error codes of the JSON-RPC errors in the first/last chunk (None for an `isError` tool result)."""
    docs: list[Any] = []
    if "json" in content_type:
        docs.append(_loads(first))
    else:
        for chunk in (first, last) if last is not first else (first,):
            docs.extend(_loads(line[5:]) for line in chunk.split(b"\n") if line.startswith(b"data:"))
    codes: list[int | None] = []
    for doc in docs:
        for item in doc if isinstance(doc, list) else [doc]:
            if not isinstance(item, dict):
                continue
            error = item.get("error")
            if isinstance(error, dict):
                code = error.get("code")
                codes.append(code if isinstance(code, int) else -32603)
            elif isinstance(item.get("result"), dict) and item["result"].get("isError") is True:
                codes.append(None)
    return codes


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _json_error(doc: Any) -> str | None:
    items = doc if isinstance(doc, list) else [doc]
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("error") is not None:
            return "jsonrpc_error" if "jsonrpc" in item else "error"
        result = item.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            return "jsonrpc_error"
    return None
