"""The load generator counts what it receives right and classifies every stream's end one way.

Its figures (chunks relayed, outcomes, time to first event) are only as good as its byte counting, which scans
each read for `data: `, `[DONE]`, SSE error events and the end of the chunked body across read boundaries. The
demo, the end-to-end tests and the benchmarks all count streams with it, so these cases hold for all three.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from balancer import proxy
from bench import _proxies, balance_quality
from emulation import loadgen as _loadgen
from tests.conftest import SHARED_DATA


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True


def _response(events: int, *, status: bytes = b"200 OK", last: bytes = b"data: [DONE]\n\n") -> bytes:
    head = (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = b""
    for i in range(events):
        event = b'data: {"i":%d}\n\n' % i
        body += b"%x\r\n%s\r\n" % (len(event), event)
    return head + body + b"%x\r\n%s\r\n" % (len(last), last) + b"0\r\n\r\n"


def _conn() -> tuple[_loadgen._Conn, _loadgen.Totals, _Transport]:
    totals = _loadgen.Totals()
    conn = _loadgen._Conn(totals, asyncio.get_running_loop())
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, totals, transport


@pytest.mark.parametrize("read_size", [1, 2, 5, 6, 7, 13, 64, 10_000])
async def test_events_and_end_are_found_across_any_read_boundaries(read_size: int) -> None:
    conn, totals, transport = _conn()
    data = _response(9)
    for _ in range(2):  # two streams back to back on one keep-alive connection
        waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
        for at in range(0, len(data), read_size):
            conn.data_received(data[at : at + read_size])
        outcome = waiter.result()
        assert outcome.ok and outcome.events == 10
        assert outcome.ttfb_s >= 0
    assert totals.events == 20
    assert len(transport.sent) == 2 and not transport.closed


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (b"503 Service Unavailable", _loadgen.StreamOutcome.REJECTED),
        (b"429 Too Many Requests", _loadgen.StreamOutcome.REJECTED),
        (b"500 Internal Server Error", _loadgen.StreamOutcome.ERROR),
        (b"404 Not Found", _loadgen.StreamOutcome.ERROR),
    ],
)
async def test_a_non_200_answer_is_rejected_or_an_error_and_drops_the_connection(
    status: bytes, kind: _loadgen.StreamOutcome
) -> None:
    conn, totals, transport = _conn()
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
    conn.data_received(_response(3, status=status))
    outcome = waiter.result()
    assert outcome.kind is kind and outcome.error == "HTTP/1.1 " + status.decode()
    assert transport.closed and totals.events == 0


async def test_a_connection_lost_before_done_cuts_the_stream() -> None:
    conn, _, _ = _conn()
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
    data = _response(5)
    conn.data_received(data[: len(data) // 2])
    conn.connection_lost(ConnectionResetError("reset"))
    outcome = waiter.result()
    assert outcome.kind is _loadgen.StreamOutcome.CUT and "connection lost" in outcome.error
    assert outcome.events > 0


async def test_a_connection_lost_before_any_answer_is_an_error() -> None:
    conn, _, _ = _conn()
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
    conn.connection_lost(ConnectionResetError("reset"))
    assert waiter.result().kind is _loadgen.StreamOutcome.ERROR


@pytest.mark.parametrize("read_size", [1, 7, 10_000])
async def test_an_sse_error_event_cuts_a_stream_that_ends_cleanly(read_size: int) -> None:
    """The balancer ends a stream whose backend died with an error event and a proper end of the body."""
    conn, _, _ = _conn()
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
    data = _response(3, last=proxy.TERMINAL_SSE_ERROR)
    for at in range(0, len(data), read_size):
        conn.data_received(data[at : at + read_size])
    outcome = waiter.result()
    assert outcome.kind is _loadgen.StreamOutcome.CUT
    assert outcome.error.startswith("event: error") and "upstream_error" in outcome.error


async def test_a_body_that_ends_without_done_is_cut() -> None:
    conn, _, _ = _conn()
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
    conn.data_received(_response(3, last=b'data: {"i":9}\n\n'))
    outcome = waiter.result()
    assert outcome.kind is _loadgen.StreamOutcome.CUT and "[DONE]" in outcome.error


async def test_abandoning_closes_after_the_first_event_and_says_so() -> None:
    conn, _, transport = _conn()
    firsts: list[int] = []
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n", on_first_event=lambda: firsts.append(1), abandon=True)
    conn.data_received(_response(5))
    outcome = waiter.result()
    assert outcome.kind is _loadgen.StreamOutcome.ABANDONED and transport.closed and firsts == [1]


def test_classification_table() -> None:
    classify, kind = _loadgen.classify, _loadgen.StreamOutcome
    assert classify(status=None, done=False, sse_error=False) is kind.ERROR
    assert classify(status=200, done=True, sse_error=False) is kind.OK
    assert classify(status=200, done=True, sse_error=True) is kind.CUT
    assert classify(status=200, done=False, sse_error=False) is kind.CUT
    assert classify(status=200, done=False, sse_error=False, abandoned=True) is kind.ABANDONED
    assert classify(status=503, done=False, sse_error=False, abandoned=True) is kind.REJECTED
    assert _loadgen.is_sse_error(b'data: {"error": {"code": 500}}\n\n')
    assert not _loadgen.is_sse_error(b'data: {"choices": [{"delta": {"content": "error"}}]}\n\n')


def test_tally_counts_each_outcome_once_and_keeps_error_texts() -> None:
    tally = _loadgen.Tally(started=3)
    tally.add(_loadgen.Outcome(_loadgen.StreamOutcome.OK, 0.1, 3))
    tally.add(_loadgen.Outcome(_loadgen.StreamOutcome.CUT, 0.1, 1, error="reset"))
    assert (tally.ok, tally.cut, tally.open, tally.errors) == (1, 1, 1, ["reset"])


def test_request_bytes_carry_the_token_count_and_connection_mode() -> None:
    raw = _loadgen.request_bytes(max_tokens=7, keep_alive=False)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b'"max_tokens": 7' in body and b'"stream": true' in body


def test_process_figures_cover_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in _proxies.process_tree(os.getpid())
        assert _proxies.rss_bytes(os.getpid()) > _proxies.rss_bytes(child.pid) > 0
        assert _proxies.cpu_seconds(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()


def test_trace_slice_starts_at_zero_and_keeps_output_tokens() -> None:
    trace = SHARED_DATA / "AzureLLMInferenceTrace_conv.csv"
    if not trace.exists():
        pytest.skip(f"{trace} is not on this machine")
    arrivals, tokens = balance_quality.read_trace(trace, start_row=10, count=50)
    assert len(arrivals) == len(tokens) == 50
    assert arrivals[0] == 0 and (arrivals[1:] >= arrivals[:-1]).all()
    assert tokens.min() >= 1
    with pytest.raises(ValueError, match="has only"):
        balance_quality.read_trace(trace, start_row=10**7, count=1)
