"""An emulated GPU inference server: what the balancer's tests, the benchmarks and the demo stand behind it.

It speaks enough of the OpenAI-compatible API of vLLM to be balanced like one: `POST /v1/chat/completions` and
`POST /v1/completions` (`stream: true` answers Server-Sent Events, one `data: {json chunk}` event per token and
then `data: [DONE]`; `stream: false` answers one JSON body), `GET /metrics` with vLLM's metric names and
`GET /health`. A GPU decodes a bounded batch of sequences at once, so the emulator has `slots`: at most that many
requests decode together, the rest wait in FIFO order (vLLM's `waiting` queue). A request that gets a slot waits
`ttft_s` (prefill) before its first token and `seconds_per_token` between tokens; the time to first token reported
in the histogram counts from arrival, so it includes the queue, as vLLM's does.

Why it is built this way: benchmarks drive it at thousands of chunks per second on a small machine, so the
per-token path is one pre-encoded `bytes` write and one sleep towards an absolute deadline (no JSON encoding, no
metric update, no logging per token; pacing to deadlines keeps the token rate right when the loop is late). The
gauges are read from the slot gate when `/metrics` is scraped instead of being updated per request. Time comes
from a `contract.clock.Clock`, so tests drive it with `FakeClock.advance()` instead of sleeping.

What it does not do: tokenize, look at prompts (every token is the text " tok"), emulate KV-cache preemption,
prefix caching or speculative decoding, or authenticate. It is a test and benchmark fixture, not a model server.

Metrics follow vLLM, with its `model_name` label: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` (gauges; the cache is taken as full when every slot runs), `vllm:time_to_first_token_seconds` (histogram), `vllm:generation_tokens_total` and
`vllm:request_success_total` (counters, updated once per finished request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from contract import clock as clock_mod

DEFAULT_MAX_TOKENS = 16
"""OpenAI's legacy completions default; used for both endpoints when the request names no limit."""

MAX_TOKENS_LIMIT = 1_000_000
"""Requests asking for more are refused with 400: a typo, not a workload (and it bounds a stream's life)."""

TOKEN_TEXT = " tok"
"""What every emulated token says; a short fixed text keeps each SSE event small and pre-encodable."""

TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
"""vLLM's own buckets for `vllm:time_to_first_token_seconds`, so dashboards read both alike."""


class SlotGate:
    """At most `slots` holders at once; the rest wait in arrival order (a slot is handed to the oldest waiter).

    A waiter that is cancelled leaves the queue; one cancelled just after it was handed a slot passes it on, so
    slots never leak. `running` and `waiting` are what `/metrics` reports.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over as we were cancelled: give it to the next one
            else:
                self._waiters.remove(future)
            raise

    def release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # hand the slot over directly: FIFO, and no barging
                return
        self._free += 1


@dataclass
class Emulator:
    """One emulated server's settings and state (kept on the app under `EMULATOR`)."""

    slots: int
    ttft_s: float
    seconds_per_token: float
    name: str
    clock: clock_mod.Clock
    gate: SlotGate = field(init=False)
    registry: CollectorRegistry = field(init=False)
    ttft_hist: Histogram = field(init=False)
    tokens_total: Counter = field(init=False)
    success_total: Counter = field(init=False)
    admitted: list[str] = field(default_factory=list)
    """Request ids in the order they got a slot (the last `ADMITTED_KEEP`), for tests of the FIFO order."""

    def __post_init__(self) -> None:
        self.gate = SlotGate(self.slots)
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model_name",)
        self.ttft_hist = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token, from arrival (queue included).",
            labels,
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.tokens_total = Counter(
            "vllm:generation_tokens", "Generated tokens.", labels, registry=self.registry
        )
        self.success_total = Counter(
            "vllm:request_success", "Requests finished.", (*labels, "finished_reason"), registry=self.registry
        )
        self.registry.register(_GateCollector(self))


ADMITTED_KEEP = 1000
"""How many admission ids `Emulator.admitted` keeps: enough for tests, bounded for long benchmark runs."""

EMULATOR = web.AppKey("emulator", Emulator)


class _GateCollector:
    """Reports the slot gate's running/waiting counts at scrape time (nothing to update per request)."""

    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    def collect(self) -> Iterable[Metric]:
        name = self._emulator.name
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests decoding on the GPU.", labels=["model_name"]
        )
        running.add_metric([name], self._emulator.gate.running)
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting for a slot.", labels=["model_name"]
        )
        waiting.add_metric([name], self._emulator.gate.waiting)
        kv_cache = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=["model_name"]
        )
        gate = self._emulator.gate
        kv_cache.add_metric([name], gate.running / gate.slots)  # each running request fills its share
        return [running, waiting, kv_cache]


def create_app(
    *,
    slots: int,
    ttft_s: float,
    seconds_per_token: float,
    name: str = "",
    clock: clock_mod.Clock = clock_mod.SYSTEM,
) -> web.Application:
    """The emulated server as an aiohttp application.

    Args:
        slots: requests decoded at once (the GPU's batch); more wait FIFO.
        ttft_s: prefill time from getting a slot to the first token.
        seconds_per_token: decode time between two tokens of one request.
        name: the model name reported in responses and the `model_name` metric label (default "emulated").
        clock: where time comes from; a `FakeClock` in tests.

    Raises:
        ValueError: slots < 1 or a negative time.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if ttft_s < 0 or seconds_per_token < 0:
        raise ValueError(f"ttft_s and seconds_per_token must be >= 0, got {ttft_s} and {seconds_per_token}")
    app = web.Application()
    app[EMULATOR] = Emulator(
        slots=slots, ttft_s=ttft_s, seconds_per_token=seconds_per_token, name=name or "emulated", clock=clock
    )
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    return app


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _health(request: web.Request) -> web.Response:
    return web.Response()


async def _models(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    return web.json_response({"object": "list", "data": [{"id": emulator.name, "object": "model"}]})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[EMULATOR].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _bad_request(message: str, param: str | None = None) -> web.Response:
    """OpenAI's error shape, so clients (and the balancer's error parsing) see what a real server sends."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return web.json_response({"error": error}, status=400)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    clock = emulator.clock
    arrived = clock.monotonic()
    try:
        body = await request.json()
    except ValueError as exc:
        return _bad_request(f"request body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(key, DEFAULT_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        return _bad_request(f"{key} must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {max_tokens!r}", key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return _bad_request(f"stream must be true or false, got {stream!r}", "stream")

    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    await emulator.gate.acquire()
    try:
        emulator.admitted.append(request_id)
        if len(emulator.admitted) > 2 * ADMITTED_KEEP:
            del emulator.admitted[:ADMITTED_KEEP]
        transport = request.transport
        if transport is None or transport.is_closing():
            return web.Response(status=499)  # the client left while queued: do not spend a slot on it
        if stream:
            return await _stream(request, emulator, request_id, max_tokens, chat=chat, arrived=arrived)
        return await _whole(emulator, request_id, max_tokens, chat=chat, arrived=arrived)
    finally:
        emulator.gate.release()


async def _stream(
    request: web.Request, emulator: Emulator, request_id: str, max_tokens: int, *, chat: bool, arrived: float
) -> web.StreamResponse:
    clock = emulator.clock
    first, middle, last, only = _sse_events(emulator, request_id, chat=chat, created=int(clock.now()))
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": request_id}
    )
    deadline = clock.monotonic() + emulator.ttft_s
    await response.prepare(request)
    step = emulator.seconds_per_token
    sent = 0
    try:
        delay = deadline - clock.monotonic()
        if delay > 0:
            await clock.sleep(delay)
        emulator.ttft_hist.labels(emulator.name).observe(clock.monotonic() - arrived)
        if max_tokens == 1:
            await response.write(only)
            sent = 1
        else:
            await response.write(first)
            sent = 1
            # The per-token path: one pre-encoded write, one sleep towards an absolute deadline.
            while sent < max_tokens - 1:
                deadline += step
                delay = deadline - clock.monotonic()
                if delay > 0:
                    await clock.sleep(delay)
                await response.write(middle)
                sent += 1
            deadline += step
            delay = deadline - clock.monotonic()
            if delay > 0:
                await clock.sleep(delay)
            await response.write(last)
            sent += 1
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away: the slot is released by the caller, like vLLM aborting the request
    finally:
        emulator.tokens_total.labels(emulator.name).inc(sent)
        reason = "length" if sent == max_tokens else "abort"
        emulator.success_total.labels(emulator.name, reason).inc()
    return response


async def _whole(
    emulator: Emulator, request_id: str, max_tokens: int, *, chat: bool, arrived: float
) -> web.Response:
    clock = emulator.clock
    created = int(clock.now())
    await clock.sleep(emulator.ttft_s)
    emulator.ttft_hist.labels(emulator.name).observe(clock.monotonic() - arrived)
    await clock.sleep(emulator.seconds_per_token * (max_tokens - 1))
    emulator.tokens_total.labels(emulator.name).inc(max_tokens)
    emulator.success_total.labels(emulator.name, "length").inc()
    text = TOKEN_TEXT * max_tokens
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return web.json_response(
        {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": emulator.name,
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": max_tokens, "total_tokens": max_tokens},
        }
    )


def _sse_events(
    emulator: Emulator, request_id: str, *, chat: bool, created: int
) -> tuple[bytes, bytes, bytes, bytes]:
    """A stream's SSE events, encoded once: first, middle, last (with `[DONE]`), and only (a one-token stream).

    The first event of a chat stream carries `role: assistant`, as OpenAI's does; the last carries the
    finish reason (`length`: the emulator always generates exactly the tokens asked for).
    """

    def event(*, role: bool, finish_reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = (
                {"role": "assistant", "content": TOKEN_TEXT} if role else {"content": TOKEN_TEXT}
            )
        else:
            choice["text"] = TOKEN_TEXT
        choice["finish_reason"] = finish_reason
        chunk = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": emulator.name,
            "choices": [choice],
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    done = b"data: [DONE]\n\n"
    return (
        event(role=True, finish_reason=None),
        event(role=False, finish_reason=None),
        event(role=False, finish_reason="length") + done,
        event(role=True, finish_reason="length") + done,
    )


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:9001), got {value!r}")
    return host, int(port)


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if number < 0 or number != number:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emulation.worker",
        description="Run an emulated GPU inference server (OpenAI-compatible SSE, vLLM metrics) on loopback.",
    )
    parser.add_argument(
        "--listen",
        type=_parse_listen,
        default=("127.0.0.1", 9001),
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free port (printed on start). Default 127.0.0.1:9001.",
    )
    parser.add_argument(
        "--slots", type=_positive_int, default=8, help="requests decoded at once; more wait FIFO (default 8)"
    )
    parser.add_argument(
        "--ttft-s",
        type=_non_negative,
        default=0.1,
        help="seconds from getting a slot to the first token, i.e. prefill (default 0.1)",
    )
    parser.add_argument(
        "--seconds-per-token",
        type=_non_negative,
        default=0.02,
        help="seconds between two tokens of one request, i.e. decode (default 0.02)",
    )
    parser.add_argument(
        "--name", default="", help="model name in responses and metric labels (default emulated)"
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    app = create_app(
        slots=args.slots, ttft_s=args.ttft_s, seconds_per_token=args.seconds_per_token, name=args.name
    )
    host, port = args.listen
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    print(f"backend_emulator listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(_serve(args))
    except (KeyboardInterrupt, web.GracefulExit):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
