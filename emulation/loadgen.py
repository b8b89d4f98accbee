"""The benchmarks' load generator: SSE streaming clients cheap enough not to be what is measured.

It runs in its own process (`python -m emulation.loadgen SPEC_JSON`), on uvloop when installed, with raw asyncio
protocols: a read counts `data: ` events with one `bytes.count` and looks at the last bytes for the end of the
chunked body; nothing is parsed per token. The benchmark scripts drive it through stdout lines of JSON, so they
can read the proxies' CPU counters exactly when the measurement window opens and closes.

Three modes (the `mode` key of the spec):

- `closed`: `concurrency` workers, each on its own keep-alive connection, run streams back to back (each of
  `max_tokens` tokens, or drawn uniformly from `max_tokens_range`, so that workers do not stay in step) for
  `warmup_s + window_s`; prints `{"event": "window_start"}` / `{"event": "window_end"}`, then the result: events
  (SSE `data:` lines) received in the window, streams started in the window with their time to first event.
  For `direct`, workers spread over all targets round robin.
- `replay`: opens one stream per arrival `[offset_s, max_tokens]` at its time on a fresh connection and reports
  each stream's time to first token, its serving backend (the emulator's model name) and whether it finished.
- `idle`: opens `count` streams that stay open after their first event (the backend is told to be slow), prints
  `{"event": "open", ...}`, holds them until a line arrives on stdin, then closes them.

A stream counts as failed if the status is not 200, the connection breaks before `data: [DONE]`, or it does not
end within `stream_timeout_s`. Everything runs on 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

STREAM_TIMEOUT_S = 300.0
"""A stream not done by then counts as failed (a stuck proxy must not hang the benchmark)."""

END_OF_CHUNKED = b"\r\n0\r\n\r\n"
"""The last-chunk marker of a chunked body: SSE responses from the emulator and every proxy end with it."""


def request_bytes(*, max_tokens: int, keep_alive: bool, path: str = "/v1/chat/completions") -> bytes:
    body = json.dumps(
        {
            "model": "m",
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
    ok: bool
    ttfb_s: float
    events: int
    backend: str = ""
    error: str = ""


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
        self._tail5 = b""
        self._tail16 = b""
        self._fresh = True
        self._head = b""
        self._backend = ""
        self._want_backend = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def start(self, request: bytes, *, want_backend: bool = False) -> asyncio.Future[Outcome]:
        assert self.transport is not None
        self._waiter = self.loop.create_future()
        self._t0 = perf_counter()
        self._first = 0.0
        self._events = 0
        self._tail5 = self._tail16 = b""
        self._fresh = True
        self._head = b""
        self._backend = ""
        self._want_backend = want_backend
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        if self._fresh:  # the status line: wait until its first 12 bytes are in, however reads split it
            self._head += data
            if len(self._head) < 12:
                return
            data, self._head = self._head, b""
            self._fresh = False
            if not (data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")):
                self._finish(False, "status " + data[:12].decode(errors="replace"))
                assert self.transport is not None
                self.transport.close()
                return
        scan = self._tail5 + data
        n = scan.count(b"data: ")
        if n:
            if not self._first:
                self._first = perf_counter()
                if self._want_backend:
                    at = data.find(b'"model":"')
                    if at >= 0:
                        self._backend = data[at + 9 : data.find(b'"', at + 9)].decode()
            self._events += n
            self.totals.events += n
        self._tail5 = scan[-5:]
        self._tail16 = (self._tail16 + data)[-16:]
        if self._tail16.endswith(END_OF_CHUNKED):
            self._finish(self._events > 0, "")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ended = b"[DONE]" in self._tail16 or self._tail16.endswith(END_OF_CHUNKED)
        self._finish(ended and self._events > 0, "" if ended else f"connection lost: {exc}")

    def _finish(self, ok: bool, error: str) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            ttfb = self._first - self._t0 if self._first else float("nan")
            waiter.set_result(Outcome(ok, ttfb, self._events, self._backend, error))


def _address(pair: Any) -> tuple[str, int]:
    """A (host, port) target from the JSON spec (a two-element list)."""
    host, port = pair
    return str(host), int(port)


async def _connect(host: str, port: int, totals: Totals) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(totals, loop), host, port)
    return conn


async def _one_stream(
    conn: _Conn | None, target: tuple[str, int], request: bytes, totals: Totals, *, want_backend: bool = False
) -> tuple[Outcome, _Conn | None, float]:
    """One stream on `conn` (or a new connection); returns the outcome, the connection to reuse, its start."""
    started = perf_counter()
    try:
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            if conn is None or conn.closed:
                conn = await _connect(*target, totals)
            outcome = await conn.start(request, want_backend=want_backend)
    except (OSError, TimeoutError) as exc:
        if conn is not None and conn.transport is not None:
            conn.transport.close()
        return Outcome(False, float("nan"), 0, error=repr(exc)), None, started
    outcome.ttfb_s += conn._t0 - started  # the connect time, when this stream opened the connection
    return outcome, (conn if outcome.ok and not conn.closed else None), started


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
        results[k] = {"ok": ok, "ttft_s": outcome.ttfb_s, "backend": outcome.backend, "error": outcome.error}

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
