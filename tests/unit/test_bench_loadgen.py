"""The benchmark load generator counts what it receives right, however the bytes are split into reads.

Its figures (chunks relayed, failed streams, time to first event) are only as good as its byte counting, which
scans each read for `data: ` and looks for the end of the chunked body across read boundaries.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

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


def _response(events: int, *, status: bytes = b"200 OK") -> bytes:
    head = (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = b""
    for i in range(events):
        event = b'data: {"i":%d}\n\n' % i
        body += b"%x\r\n%s\r\n" % (len(event), event)
    done = b"data: [DONE]\n\n"
    return head + body + b"%x\r\n%s\r\n" % (len(done), done) + b"0\r\n\r\n"


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


async def test_a_non_200_answer_fails_the_stream_and_drops_the_connection() -> None:
    conn, totals, transport = _conn()
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
    conn.data_received(_response(3, status=b"503 Service Unavailable"))
    outcome = waiter.result()
    assert not outcome.ok and outcome.error.startswith("status ")
    assert transport.closed and totals.events == 0


async def test_a_connection_lost_before_done_fails_the_stream() -> None:
    conn, _, _ = _conn()
    waiter = conn.start(b"GET / HTTP/1.1\r\n\r\n")
    data = _response(5)
    conn.data_received(data[: len(data) // 2])
    conn.connection_lost(ConnectionResetError("reset"))
    outcome = waiter.result()
    assert not outcome.ok and "connection lost" in outcome.error
    assert outcome.events > 0


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
