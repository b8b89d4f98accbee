"""The protocol-level body relay (balancer/relay.py) on loopback: framing, connection reuse, backpressure, endings.

These tests run again on uvloop (tests/integration/uvloop/), which production uses: the relay swaps transport
protocols and pauses reading, which each loop implements in its own way."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from balancer import relay
from tests.fakes.balancer_env import RawBackend, balancer, completion_body, emulators, read_sse, wait_until

FAST = {"slots": 8, "ttft_s": 0.0, "seconds_per_token": 0.0}

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(5)]
CHUNKED_BODY = (
    b"".join(b"%x;ext=%d\r\n%s\r\n" % (len(e), i, e) for i, e in enumerate(EVENTS))
    + b"0\r\nX-Trailer: yes\r\n\r\n"
)


def _pipes(lb: object) -> list[relay.Pipe]:
    bal = lb.bal  # type: ignore[attr-defined]
    return [
        lease.stream
        for b in bal.pool.backends.values()
        for lease in b.leases
        if isinstance(lease.stream, relay.Pipe)
    ]


async def test_chunked_body_split_at_every_byte_passes_through_and_the_connection_is_reused() -> None:
    async def byte_by_byte(index: int, head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD)
        for i in range(len(CHUNKED_BODY)):
            writer.write(CHUNKED_BODY[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    async with RawBackend(byte_by_byte) as raw, balancer([raw.address]) as lb:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                    assert resp.headers["Transfer-Encoding"] == "chunked"
                    assert await resp.read() == b"".join(EVENTS)
        backend = lb.bal.pool.backends[raw.address]
        assert (backend.active, backend.completed, backend.failed) == (0, 2, {})
        assert backend.relayed_bytes == 2 * len(CHUNKED_BODY)
        assert raw.connections == 1 and [i for i, _ in raw.requests] == [0, 0]


async def test_a_head_split_at_every_byte_after_an_interim_103_is_found() -> None:
    """The tap looks for the end of the final head however it arrives, passing interim 1xx heads to aiohttp."""
    whole = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + CHUNKED_HEAD + CHUNKED_BODY
    )

    async def byte_by_byte(index: int, head: bytes, writer: asyncio.StreamWriter) -> None:
        for i in range(len(whole)):
            writer.write(whole[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    async with RawBackend(byte_by_byte) as raw, balancer([raw.address]) as lb:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                assert resp.status == 200
                assert await resp.read() == b"".join(EVENTS)
        backend = lb.bal.pool.backends[raw.address]
        assert backend.relayed_bytes == len(CHUNKED_BODY) and backend.completed == 1


async def test_content_length_body_is_relayed_by_its_length_and_the_connection_is_reused() -> None:
    async with emulators(FAST) as addrs, balancer(addrs) as lb, aiohttp.ClientSession() as http:
        for _ in range(3):
            body = completion_body(tokens=3, stream=False)
            async with http.post(f"{lb.url}/v1/completions", json=body) as resp:
                assert resp.status == 200 and "Transfer-Encoding" not in resp.headers
                assert int(resp.headers["Content-Length"]) == len(await resp.read())
        backend = lb.bal.pool.backends[addrs[0]]
        assert (backend.active, backend.completed) == (0, 3)
        assert lb.bal.client is not None and lb.bal.client.connector is not None
        pooled = lb.bal.client.connector._conns  # the one kept-alive connection, back in the pool
        assert sum(len(v) for v in pooled.values()) == 1


async def test_bytes_past_the_end_of_the_body_are_dropped_and_the_connection_is_not_reused() -> None:
    async def trailing_garbage(index: int, head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + CHUNKED_BODY + b"HTTP/1.1 200 OK\r\n\r\n")
        await writer.drain()

    async with RawBackend(trailing_garbage) as raw, balancer([raw.address]) as lb:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                    assert await resp.read() == b"".join(EVENTS)
        assert raw.connections == 2 and [i for i, _ in raw.requests] == [0, 1]


async def test_backend_dying_inside_a_chunk_cuts_the_client_connection() -> None:
    async def dies_mid_chunk(index: int, head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + b"%x\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0]) + b"100\r\ndata: {")
        await writer.drain()
        writer.transport.abort()

    async with RawBackend(dies_mid_chunk) as raw, balancer([raw.address]) as lb:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                got = b""
                try:
                    async for piece in resp.content.iter_any():
                        got += piece
                    truncated = False
                except aiohttp.ClientPayloadError:
                    truncated = True
            assert truncated and got.startswith(EVENTS[0])  # a cut body, never a short "success"
        backend = lb.bal.pool.backends[raw.address]
        assert backend.active == 0 and backend.failed == {"midstream": 1}


async def test_invalid_chunk_framing_is_a_backend_failure() -> None:
    async def bad_size(index: int, head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + b"0x10\r\n0123456789abcdef\r\n0\r\n\r\n")
        await writer.drain()

    async with RawBackend(bad_size) as raw, balancer([raw.address]) as lb:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                events = await read_sse(resp)  # between chunks: the stream gets the clean error event
            assert json.loads(events[-1])["error"]["type"] == "upstream_error"
        backend = lb.bal.pool.backends[raw.address]
        assert backend.active == 0 and backend.failed == {"midstream": 1}


async def test_a_client_that_stops_reading_pauses_the_backend_until_it_leaves() -> None:
    tokens = 200_000  # ~30 MB of events, sent as fast as the backend can write
    async with emulators(FAST) as addrs, balancer(addrs) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.served.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        body = json.dumps(completion_body(tokens=tokens)).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await wait_until(lambda: any(p.paused for p in _pipes(lb)), what="the relay paused the backend")
        (pipe,) = _pipes(lb)
        assert pipe.total_bytes < tokens * 100  # held back: far less than the body went through
        await reader.read(1024)  # the client reads a little: the relay resumes and pauses again
        writer.close()
        await wait_until(lambda: lb.active() == 0, what="the lease returned after the client left")
        backend = lb.bal.pool.backends[addrs[0]]
        assert backend.completed == 0 and set(backend.failed) <= {"client_gone", "cancelled"}


async def test_client_leaving_mid_stream_closes_the_backend_request() -> None:
    paced = {"slots": 1, "ttft_s": 0.0, "seconds_per_token": 0.02}
    async with emulators(paced) as addrs, balancer(addrs) as lb, aiohttp.ClientSession() as http:
        resp = await http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=100_000))
        await resp.content.readline()
        resp.close()
        await wait_until(lambda: lb.active() == 0, what="the lease returned after the client left")

        # The backend's one slot is free again only if the relay ended its request: a new stream gets it.
        async with asyncio.timeout(10):
            async with http.post(f"{lb.url}/v1/completions", json=completion_body(tokens=2)) as again:
                assert (await read_sse(again))[-1] == "[DONE]"


async def test_http_1_0_client_gets_the_chunked_body_unchunked_through_aiohttp() -> None:
    async with emulators(FAST) as addrs, balancer(addrs) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.served.port)
        body = json.dumps(completion_body(tokens=3)).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        answer = await reader.read()  # HTTP/1.0: the body ends when the connection closes
        writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
        assert payload.count(b"data: ") == 4 and payload.endswith(b"data: [DONE]\n\n")
        assert lb.active() == 0
