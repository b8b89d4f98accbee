"""The emulated GPU backend behaves like the server it stands in for: slots, FIFO queue, token counts, metrics, SSE.

Time is a `FakeClock`: tests advance it second by second and wait (bounded) for the state each step must reach,
so nothing depends on how fast this machine runs. Requests travel over real loopback HTTP.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from contract import clock
from emulation import worker as backend_emulator

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until `predicate()` holds; fail (not hang) if it never does."""
    async with asyncio.timeout(10):
        for _ in range(200_000):
            if predicate():
                return
            await asyncio.sleep(0)
    raise AssertionError(f"never saw: {what}")


def _parse_sse(body: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing strictly (every event `data: ...\\n\\n`)."""
    assert body.endswith(b"\n\n"), body[-40:]
    events = body[:-2].split(b"\n\n")
    payloads = []
    for event in events:
        assert event.startswith(b"data: "), event
        assert b"\n" not in event, event
        payloads.append(event[len(b"data: ") :].decode())
    return payloads


async def _metrics(client: TestClient[Any, Any]) -> dict[str, float]:
    """Every sample of `/metrics` by name and labels, parsed with prometheus_client's own parser."""
    response = await client.get("/metrics")
    assert response.status == 200
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class _Streams:
    """Concurrent streaming clients, recording tokens received and the order they finish."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.tokens: dict[str, int] = {}
        self.done: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, label: str, max_tokens: int) -> None:
        self.tokens[label] = 0
        self.tasks.append(asyncio.create_task(self._run(label, max_tokens)))

    async def _run(self, label: str, max_tokens: int) -> None:
        body = {"model": "m", "messages": [], "stream": True, "max_tokens": max_tokens}
        async with self.client.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200
            async for line in response.content:
                if line.startswith(b"data: {"):
                    self.tokens[label] += 1
        self.done.append(label)

    def in_progress(self) -> int:
        return sum(1 for label, n in self.tokens.items() if n > 0 and label not in self.done)

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks)


async def test_streams_one_sse_event_per_token_then_done(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(
        backend_emulator.create_app(slots=4, ttft_s=0.0, seconds_per_token=0.0, name="llama")
    )
    for path, max_tokens in (
        ("/v1/chat/completions", 1),
        ("/v1/chat/completions", 37),
        ("/v1/completions", 5),
    ):
        response = await client.post(path, json={"prompt": "hi", "stream": True, "max_tokens": max_tokens})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        payloads = _parse_sse(await response.read())
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert len(chunks) == max_tokens
        assert {c["id"] for c in chunks} == {response.headers["X-Request-Id"]}
        assert all(c["model"] == "llama" for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (max_tokens - 1) + ["length"]
        if path == "/v1/chat/completions":
            assert chunks[0]["object"] == "chat.completion.chunk"
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == " tok" * max_tokens
        else:
            assert "".join(c["choices"][0]["text"] for c in chunks) == " tok" * max_tokens


async def test_non_streaming_answers_one_json_body_with_usage(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(backend_emulator.create_app(slots=1, ttft_s=0.0, seconds_per_token=0.0))
    response = await client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 7})
    assert response.status == 200
    body = await response.json()
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["message"]["content"] == " tok" * 7
    default = await (await client.post("/v1/completions", json={"prompt": "x"})).json()
    assert default["usage"]["completion_tokens"] == backend_emulator.DEFAULT_MAX_TOKENS
    assert (await client.get("/health")).status == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"max_tokens": 0}', "max_tokens"),
        (b'{"stream": "yes"}', "stream"),
    ],
)
async def test_bad_requests_get_400_with_openai_error_body(
    aiohttp_client: ClientFactory, body: bytes, param: str | None
) -> None:
    app = backend_emulator.create_app(slots=1, ttft_s=0.0, seconds_per_token=0.0)
    client = await aiohttp_client(app)
    response = await client.post("/v1/completions", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert app[backend_emulator.EMULATOR].gate.running == 0


async def test_queued_requests_get_slots_in_arrival_order(aiohttp_client: ClientFactory) -> None:
    fake = clock.FakeClock()
    app = backend_emulator.create_app(slots=1, ttft_s=1.0, seconds_per_token=1.0, clock=fake)
    gate = app[backend_emulator.EMULATOR].gate
    streams = _Streams(await aiohttp_client(app))
    labels = ["A", "B", "C", "D"]
    for i, label in enumerate(labels):
        streams.start(label, max_tokens=2)
        await _until(lambda i=i: gate.running == 1 and gate.waiting == i, f"{label} queued behind {i}")
    for i, label in enumerate(labels):
        fake.advance(1.0)  # prefill of the request holding the slot
        await _until(lambda label=label: streams.tokens[label] == 1, f"{label} got its first token")
        assert [n for n in streams.tokens.values() if n] == [2] * i + [1]  # nobody else started
        fake.advance(1.0)  # its second and last token
        await _until(lambda i=i: streams.done == labels[: i + 1], f"{labels[: i + 1]} finished in order")
    await streams.finish()
    assert gate.running == 0 and gate.waiting == 0


async def test_no_more_than_slots_streams_decode_at_once(aiohttp_client: ClientFactory) -> None:
    fake = clock.FakeClock()
    app = backend_emulator.create_app(slots=3, ttft_s=1.0, seconds_per_token=1.0, clock=fake)
    gate = app[backend_emulator.EMULATOR].gate
    streams = _Streams(await aiohttp_client(app))
    for i in range(8):
        streams.start(f"s{i}", max_tokens=1 + i % 3)
    await _until(lambda: gate.running == 3 and gate.waiting == 5, "3 decoding, 5 queued")
    for _ in range(40):
        if len(streams.done) == 8:
            break
        before = sum(streams.tokens.values())
        fake.advance(1.0)  # every running stream is due a token (or its first) at each whole second
        await _until(lambda before=before: sum(streams.tokens.values()) > before, "tokens flowing")
        assert streams.in_progress() <= 3
        assert gate.running <= 3
    await streams.finish()
    assert streams.tokens == {f"s{i}": 1 + i % 3 for i in range(8)}


async def test_metrics_report_running_waiting_and_time_to_first_token(aiohttp_client: ClientFactory) -> None:
    """TTFT counts from arrival, queue included: with one slot, 1+3+5 seconds for three 2-token requests."""
    fake = clock.FakeClock()
    app = backend_emulator.create_app(slots=1, ttft_s=1.0, seconds_per_token=1.0, name="m", clock=fake)
    gate = app[backend_emulator.EMULATOR].gate
    client = await aiohttp_client(app)
    streams = _Streams(client)
    for i, label in enumerate("ABC"):
        streams.start(label, max_tokens=2)
        await _until(lambda i=i: gate.waiting == i and gate.running == 1, f"{label} in")
    metrics = await _metrics(client)
    assert metrics["vllm:num_requests_running"] == 1
    assert metrics["vllm:num_requests_waiting"] == 2
    for step in range(6):
        fake.advance(1.0)
        await _until(lambda step=step: len(streams.done) == (step + 1) // 2, f"{(step + 1) // 2} done")
        await _until(lambda step=step: sum(streams.tokens.values()) == step + 1, f"{step + 1} tokens")
    await streams.finish()
    metrics = await _metrics(client)
    assert metrics["vllm:num_requests_running"] == 0
    assert metrics["vllm:num_requests_waiting"] == 0
    assert metrics["vllm:time_to_first_token_seconds_count"] == 3
    assert metrics["vllm:time_to_first_token_seconds_sum"] == pytest.approx(1 + 3 + 5)
    assert metrics["vllm:time_to_first_token_seconds_bucket{le=1.0}"] == 1
    assert metrics["vllm:time_to_first_token_seconds_bucket{le=2.5}"] == 1
    assert metrics["vllm:time_to_first_token_seconds_bucket{le=5.0}"] == 3
    assert metrics["vllm:generation_tokens_total"] == 6
    assert metrics["vllm:request_success_total{finished_reason=length}"] == 3


async def test_a_client_that_leaves_frees_its_slot_for_the_next(aiohttp_client: ClientFactory) -> None:
    fake = clock.FakeClock()
    app = backend_emulator.create_app(slots=1, ttft_s=1.0, seconds_per_token=1.0, clock=fake)
    gate = app[backend_emulator.EMULATOR].gate
    client = await aiohttp_client(app)
    leaving = await client.post("/v1/completions", json={"stream": True, "max_tokens": 100})
    await _until(lambda: gate.running == 1, "first request decoding")
    streams = _Streams(client)
    streams.start("next", max_tokens=1)
    await _until(lambda: gate.waiting == 1, "second request queued")
    fake.advance(1.0)
    assert (await leaving.content.readuntil(b"\n\n")).startswith(b"data: {")
    leaving.close()
    for _ in range(10):
        if streams.done:
            break
        fake.advance(1.0)  # the emulator notices on its next writes, like a server noticing a reset
        for _ in range(200):
            await asyncio.sleep(0)
    await _until(lambda: streams.done == ["next"], "the queued request got the slot and finished")
    await streams.finish()
    metrics = await _metrics(client)
    assert metrics["vllm:request_success_total{finished_reason=abort}"] == 1
    assert gate.running == 0


def test_cli_documents_every_option_and_rejects_bad_values() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "emulation.worker", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--listen", "--slots", "--ttft-s", "--seconds-per-token", "--name"):
        assert option in help_text
    parser = backend_emulator.build_parser()
    assert all(action.help for action in parser._actions)
    bad = subprocess.run(
        [sys.executable, "-m", "emulation.worker", "--slots", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "expected an integer >= 1, got '0'" in bad.stderr


async def test_cli_serves_on_the_port_it_prints() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "emulation.worker",
        "--listen",
        "127.0.0.1:0",
        "--slots",
        "2",
        "--ttft-s",
        "0",
        "--seconds-per-token",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("backend_emulator listening on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"stream": true, "max_tokens": 3}'
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with asyncio.timeout(30):
            raw = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert raw.startswith(b"HTTP/1.1 200")
        assert raw.count(b"data: {") == 3 and b"data: [DONE]" in raw
    finally:
        proc.terminate()
        await proc.wait()
