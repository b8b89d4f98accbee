"""The load generator, the one streaming client the demo, the end-to-end tests and the benchmarks use.

Every stream ends in exactly one `StreamOutcome`, classified in one place (`classify`):

- `ok`: a 200 response that reached `data: [DONE]` and carried no SSE error event;
- `error`: no 200 response at all: the connection failed, the status was not 200 (other than 429/503), or the
  stream timed out before its headers;
- `cut`: a 200 response that did not reach `[DONE]`: an SSE error event (`event: error`, or a `data:` object
  whose first key is "error", as the balancer, vLLM and OpenAI end a failed stream), a reset, a premature end of
  the body, or a timeout mid-stream;
- `rejected`: 429 or 503, admission said no;
- `abandoned`: the client itself walked away after the first event, on purpose.

The client is raw asyncio protocols (on uvloop when the process runs one), cheap enough not to be what a
benchmark measures: a read counts `data: ` events with one `bytes.count` and looks at the last bytes for
`[DONE]`, an error event and the end of the chunked body; nothing is parsed per token. `stream()` runs one
stream in the caller's event loop (the demo and `tests.fakes.e2e_load`); the benchmark scripts run this module
in its own process (`python -m emulation.loadgen SPEC_JSON`) and read stdout lines of JSON, so they can read
the proxies' CPU counters exactly when the measurement window opens and closes.

Three process modes (the `mode` key of the spec):

- `closed`: `concurrency` workers, each on its own keep-alive connection, run streams back to back (each of
  `max_tokens` tokens, or drawn uniformly from `max_tokens_range`, so that workers do not stay in step) for
  `warmup_s + window_s`; prints `{"event": "window_start"}` / `{"event": "window_end"}`, then the result: events
  (SSE `data:` lines) received in the window, streams started in the window with their time to first event.
  For `direct`, workers spread over all targets round robin.
- `replay`: opens one stream per arrival `[offset_s, max_tokens]` at its time on a fresh connection and reports
  each stream's time to first token, its serving backend (the emulator's model name), whether it finished and
  its outcome.
- `idle`: opens `count` streams that stay open after their first event (the backend is told to be slow), prints
  `{"event": "open", ...}`, holds them until a line arrives on stdin, then closes them.

A stream not done within its timeout (`STREAM_TIMEOUT_S` by default) ends as `error` or `cut`. Everything runs
on loopback and every loop is bounded in count and time.

What it does not do: TLS, HTTP/2, retries, or parse the events' JSON.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

STREAM_TIMEOUT_S = 300.0
"""A stream not done by then fails (a stuck proxy must not hang the benchmark)."""

END_OF_CHUNKED = b"\r\n0\r\n\r\n"
"""The last-chunk marker of a chunked body: SSE responses from the emulator and every proxy end with it."""

DONE = b"data: [DONE]"

SSE_ERROR_MARKERS = (b"event: error", b'data: {"error"', b'data:{"error"')
"""How an SSE stream says it failed: an `error` event, or a data object whose first key is "error"."""

TAIL_BYTES = 32
"""Bytes kept from the previous read, so a marker split across two reads is still found (longer than any)."""

REJECTED_STATUSES = (429, 503)

ERROR_TEXT_BYTES = 200
"""How much of an error event or status line an outcome keeps, for the report."""


class StreamOutcome(enum.StrEnum):
    """How one stream ended; see the module docstring."""

    OK = "ok"
    ERROR = "error"
    CUT = "cut"
    REJECTED = "rejected"
    ABANDONED = "abandoned"


def classify(*, status: int | None, done: bool, sse_error: bool, abandoned: bool = False) -> StreamOutcome:
    """The one classification of a stream's end.

    Args:
        status: the response's HTTP status, None when no response head arrived.
        done: `data: [DONE]` arrived.
        sse_error: an SSE error event arrived (`is_sse_error`).
        abandoned: the client closed the stream itself after its first event.
    """
    if status is None:
        return StreamOutcome.ERROR
    if status in REJECTED_STATUSES:
        return StreamOutcome.REJECTED
    if status != 200:
        return StreamOutcome.ERROR
    if abandoned:
        return StreamOutcome.ABANDONED
    if done and not sse_error:
        return StreamOutcome.OK
    return StreamOutcome.CUT


def is_sse_error(data: bytes) -> bool:
    """Whether `data` (one or more SSE lines) holds an error event."""
    return any(marker in data for marker in SSE_ERROR_MARKERS)


def request_bytes(
    *, max_tokens: int, keep_alive: bool, path: str = "/v1/chat/completions", model: str = "m"
) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": max_tokens,
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Totals:
    events: int = 0
    """SSE `data:` lines received by every connection since start (the window is a difference of two reads)."""


@dataclass
class Outcome:
    """One stream's end: its outcome, time to first event (NaN without one), events, backend, error text."""

    kind: StreamOutcome
    ttfb_s: float
    events: int
    backend: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.kind is StreamOutcome.OK


@dataclass
class Tally:
    """Streams started and how each ended, with the error text of those that did not end `ok`."""

    started: int = 0
    ok: int = 0
    error: int = 0
    cut: int = 0
    rejected: int = 0
    abandoned: int = 0
    errors: list[str] = field(default_factory=list)
    max_errors: int = 1000
    """Error texts kept at most (a broken run must not fill memory with the same message)."""

    def add(self, outcome: Outcome) -> None:
        """Count one ended stream."""
        setattr(self, outcome.kind.value, getattr(self, outcome.kind.value) + 1)
        if outcome.kind is not StreamOutcome.OK and outcome.error and len(self.errors) < self.max_errors:
            self.errors.append(outcome.error)

    @property
    def ended(self) -> int:
        return self.ok + self.error + self.cut + self.rejected + self.abandoned

    @property
    def open(self) -> int:
        return self.started - self.ended


class _Conn(asyncio.Protocol):
    """One client connection carrying streams one after another (keep-alive) or one (close)."""

    def __init__(self, totals: Totals, loop: asyncio.AbstractEventLoop) -> None:
        self.totals = totals
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[Outcome] | None = None
        self._t0 = 0.0
        self._first = 0.0
        self._events = 0
        self._tail = b""
        self._fresh = True
        self._head = b""
        self._backend = ""
        self._want_backend = False
        self._status: int | None = None
        self._error = b""
        self._on_first: Callable[[], None] | None = None
        self._abandon = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def start(
        self,
        request: bytes,
        *,
        want_backend: bool = False,
        on_first_event: Callable[[], None] | None = None,
        abandon: bool = False,
    ) -> asyncio.Future[Outcome]:
        assert self.transport is not None
        self._waiter = self.loop.create_future()
        self._t0 = perf_counter()
        self._first = 0.0
        self._events = 0
        self._tail = b""
        self._fresh = True
        self._head = b""
        self._backend = ""
        self._want_backend = want_backend
        self._status = None
        self._error = b""
        self._on_first = on_first_event
        self._abandon = abandon
        self.transport.write(request)
        return self._waiter

    @property
    def status(self) -> int | None:
        """The current stream's HTTP status, None before its status line arrived."""
        return self._status

    def data_received(self, data: bytes) -> None:
        if self._fresh:  # the status line: wait until its first 12 bytes are in, however reads split it
            self._head += data
            if len(self._head) < 12:
                return
            data, self._head = self._head, b""
            self._fresh = False
            try:
                self._status = int(data[9:12])
            except ValueError:
                self._status = 0
            if self._status != 200:
                line = data[: data.find(b"\r\n")] if b"\r\n" in data else data[:64]
                self._finish(line.decode(errors="replace")[:ERROR_TEXT_BYTES])
                assert self.transport is not None
                self.transport.close()
                return
        scan = self._tail + data
        n = scan.count(b"data: ") - self._tail.count(b"data: ")
        if self._error:  # keep the error event's text, however the reads split it
            if len(self._error) < ERROR_TEXT_BYTES:
                self._error = (self._error + data)[:ERROR_TEXT_BYTES]
        elif b"error" in scan and is_sse_error(scan):
            at = min(scan.find(m) for m in SSE_ERROR_MARKERS if m in scan)
            self._error = scan[at : at + ERROR_TEXT_BYTES]
        if n:
            if not self._first:
                self._first = perf_counter()
                if self._want_backend:
                    at = data.find(b'"model":"')
                    if at >= 0:
                        self._backend = data[at + 9 : data.find(b'"', at + 9)].decode()
                if self._on_first is not None:
                    self._on_first()
                if self._abandon:
                    self._finish("abandoned by the client", abandoned=True)
                    assert self.transport is not None
                    self.transport.close()
                    return
            self._events += n
            self.totals.events += n
        self._tail = scan[-TAIL_BYTES:]
        if self._tail.endswith(END_OF_CHUNKED):
            self._finish("" if DONE in self._tail else "the body ended without data: [DONE]")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ended = DONE in self._tail or self._tail.endswith(END_OF_CHUNKED)
        self._finish("" if ended else f"connection lost: {exc}")

    def _finish(self, error: str, *, abandoned: bool = False) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        done = DONE in self._tail
        kind = classify(status=self._status, done=done, sse_error=bool(self._error), abandoned=abandoned)
        if self._error:
            error = self._error.decode(errors="replace")
        ttfb = self._first - self._t0 if self._first else float("nan")
        waiter.set_result(
            Outcome(kind, ttfb, self._events, self._backend, "" if kind is StreamOutcome.OK else error)
        )


def _address(pair: Any) -> tuple[str, int]:
    """A (host, port) target from the JSON spec (a two-element list)."""
    host, port = pair
    return str(host), int(port)


async def _connect(host: str, port: int, totals: Totals) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(totals, loop), host, port)
    return conn


async def _one_stream(
    conn: _Conn | None,
    target: tuple[str, int],
    request: bytes,
    totals: Totals,
    *,
    want_backend: bool = False,
    timeout_s: float = STREAM_TIMEOUT_S,
    on_first_event: Callable[[], None] | None = None,
    abandon: bool = False,
) -> tuple[Outcome, _Conn | None, float]:
    """One stream on `conn` (or a new connection); returns the outcome, the connection to reuse, its start."""
    started = perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            if conn is None or conn.closed:
                conn = await _connect(*target, totals)
            outcome = await conn.start(
                request, want_backend=want_backend, on_first_event=on_first_event, abandon=abandon
            )
    except asyncio.CancelledError:
        if conn is not None and conn.transport is not None:
            conn.transport.close()
        raise
    except (OSError, TimeoutError) as exc:
        status = None
        if conn is not None:
            status = conn.status
            if conn.transport is not None:
                conn.transport.close()
        kind = classify(status=status, done=False, sse_error=False)
        return Outcome(kind, float("nan"), 0, error=repr(exc)[:ERROR_TEXT_BYTES]), None, started
    outcome.ttfb_s += conn._t0 - started  # the connect time, when this stream opened the connection
    return outcome, (conn if outcome.ok and not conn.closed else None), started


async def stream(
    target: tuple[str, int],
    *,
    max_tokens: int,
    model: str = "m",
    timeout_s: float = STREAM_TIMEOUT_S,
    on_first_event: Callable[[], None] | None = None,
    abandon: bool = False,
) -> Outcome:
    """Run one streaming completion on a fresh connection to `target` in the running event loop.

    `on_first_event` is called when the first `data:` event arrives (the demo stamps its wait then);
    `abandon` closes the stream right after it (a client that goes away).
    """
    request = request_bytes(max_tokens=max_tokens, keep_alive=False, model=model)
    outcome, conn, _ = await _one_stream(
        None, target, request, Totals(), timeout_s=timeout_s, on_first_event=on_first_event, abandon=abandon
    )
    if conn is not None and conn.transport is not None:
        conn.transport.close()
    return outcome


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@dataclass
class _Window:
    start: float = float("inf")
    end: float = float("inf")
    stop: bool = False
    ttfb_s: list[float] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def _closed(spec: dict[str, Any]) -> dict[str, Any]:
    totals = Totals()
    targets = [_address(t) for t in spec["targets"]]
    low, high = spec.get("max_tokens_range") or (spec["max_tokens"], spec["max_tokens"])
    lengths = sorted({round(low + (high - low) * k / 20) for k in range(21)})
    requests = [
        request_bytes(max_tokens=n, keep_alive=True) for n in lengths
    ]  # encoded once, drawn per stream
    rng = random.Random(spec.get("seed", 0))
    window = _Window()
    concurrency = int(spec["concurrency"])
    ramp_s = min(1.0, spec["warmup_s"] / 2)

    live: set[_Conn] = set()

    async def worker(i: int) -> None:
        await asyncio.sleep(ramp_s * i / concurrency)  # spread the first requests over the ramp
        conn: _Conn | None = None
        target = targets[i % len(targets)]
        for _ in range(1_000_000):
            if window.stop:
                break
            request = rng.choice(requests)
            outcome, conn, started = await _one_stream(conn, target, request, totals)
            if conn is not None:
                live.add(conn)
            if not window.start <= started < window.end:
                continue
            if outcome.ttfb_s == outcome.ttfb_s:  # got its first event (NaN otherwise)
                window.ttfb_s.append(outcome.ttfb_s)
            if outcome.ok:
                window.ok += 1
            elif not window.stop:  # streams cut by the end of the run are not failures
                window.failed += 1
                window.errors[outcome.error[:60]] = window.errors.get(outcome.error[:60], 0) + 1

    cpu0 = time.process_time()
    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(spec["warmup_s"])
    window.start = perf_counter()
    events0 = totals.events
    _emit({"event": "window_start"})
    await asyncio.sleep(spec["window_s"])
    window.end = perf_counter()
    events1 = totals.events
    _emit({"event": "window_end"})
    window.stop = True
    for conn in live:  # end the streams still running: the window is over
        if conn.transport is not None:
            conn.transport.close()
    async with asyncio.timeout(STREAM_TIMEOUT_S + 10):
        await asyncio.gather(*tasks)
    return {
        "events": events1 - events0,
        "window_s": window.end - window.start,
        "streams_ok": window.ok,
        "streams_failed": window.failed,
        "errors": window.errors,
        "ttfb_s": window.ttfb_s,
        "loadgen_cpu_s": time.process_time() - cpu0,
    }


async def _replay(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    totals = Totals()
    target = _address(spec["target"])
    arrivals = spec["arrivals"]
    results: list[dict[str, Any]] = [{} for _ in arrivals]

    async def one(k: int, max_tokens: int) -> None:
        request = request_bytes(max_tokens=max_tokens, keep_alive=False)
        outcome, conn, _ = await _one_stream(None, target, request, totals, want_backend=True)
        if conn is not None and conn.transport is not None:
            conn.transport.close()
        ok = outcome.ok and outcome.events == max_tokens + 1
        results[k] = {
            "ok": ok,
            "outcome": outcome.kind.value,
            "ttft_s": outcome.ttfb_s,
            "backend": outcome.backend,
            "error": outcome.error,
        }

    t0 = loop.time()
    tasks = []
    for k, (offset_s, max_tokens) in enumerate(arrivals):
        delay = t0 + offset_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(k, int(max_tokens))))
    async with asyncio.timeout(STREAM_TIMEOUT_S + 10):
        await asyncio.gather(*tasks)
    return {"streams": results, "duration_s": loop.time() - t0}


async def _idle(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    totals = Totals()
    target = _address(spec["target"])
    request = request_bytes(max_tokens=2, keep_alive=True)
    conns: list[_Conn] = []
    failed = 0
    for _ in range(int(spec["count"])):
        try:
            conn = await _connect(*target, totals)
        except OSError:
            failed += 1
            continue
        conn.start(request)
        conns.append(conn)
    async with asyncio.timeout(120):
        for _ in range(120_000):
            if sum(1 for c in conns if c._first or c.closed) >= len(conns):
                break
            await asyncio.sleep(0.01)
    opened = sum(1 for c in conns if c._first and not c.closed)
    _emit({"event": "open", "opened": opened, "failed": failed + len(conns) - opened})
    await loop.run_in_executor(None, sys.stdin.readline)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return {"opened": opened}


def main() -> None:
    spec = json.loads(sys.argv[1])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode = {"closed": _closed, "replay": _replay, "idle": _idle}[spec["mode"]]
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(mode(spec))
    else:
        result = uvloop.run(mode(spec))
    _emit({"event": "result", **result})


if __name__ == "__main__":
    main()
