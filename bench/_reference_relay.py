"""A reference point, not a balancer: the cheapest streaming relay Python can do, to size what aiohttp costs.

`python -m bench._reference_relay PORT HOST:PORT...` listens on 127.0.0.1:PORT and relays each HTTP/1.1 request
to the backends round robin at the asyncio-protocol level: the request head and body (Content-Length only) go
to a pooled keep-alive backend connection, and every byte the backend sends is written straight to the client
transport from `data_received`, with no parsing but a look at the last bytes for the end of the chunked body.
Backpressure: a client transport above its high-water mark pauses reading from the backend.

With `--aiohttp` first it is instead the barest aiohttp relay: read the request, `ClientSession.request()` to the
next backend, then `async for chunk in upstream.content.iter_any(): await resp.write(chunk)`, the same
machinery Forestall's per-chunk path uses, without any of Forestall's bookkeeping.

`bench/relay.py --reference-relay` measures both in the same run as NGINX, HAProxy and Forestall, to show how
much of Forestall's cost per chunk is Python itself, how much is the aiohttp client/server stream machinery
(`ClientResponse.content.iter_any()` + `StreamResponse.write()`), and how much is Forestall's own. It does no load balancing beyond round robin,
no header rewriting, no failure handling and no chunked request bodies; never put it in front of anything.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

END_OF_CHUNKED = b"\r\n0\r\n\r\n"
"""The last-chunk marker of the emulator's chunked SSE responses: where one response ends on a kept-alive link."""


class _Backend(asyncio.Protocol):
    def __init__(self, index: int, idle: dict[int, list[_Backend]]) -> None:
        self.index = index
        self.idle = idle
        self.client: _Client | None = None
        self.transport: asyncio.Transport | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        client.transport.write(data)  # the whole per-chunk path
        self.tail = (self.tail + data)[-8:]
        if self.tail.endswith(END_OF_CHUNKED):
            self.client, self.tail = None, b""
            self.idle[self.index].append(self)
            client.response_done()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle[self.index]:
            self.idle[self.index].remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False
        self.backend: _Backend | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next_request()

    def pause_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()

    def response_done(self) -> None:
        self.busy, self.backend = False, None
        if self.buffer:
            self._next_request()

    def _next_request(self) -> None:
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        request, self.buffer = head + sep + rest[:length], rest[length:]
        self.busy = True
        task = asyncio.ensure_future(self._send(request))
        self.relay.tasks.add(task)  # keep a reference until it is done (the loop holds only weak ones)
        task.add_done_callback(self.relay.tasks.discard)

    async def _send(self, request: bytes) -> None:
        backend = await self.relay.backend()
        backend.client = self
        self.backend = backend
        assert backend.transport is not None
        backend.transport.write(request)


class _Relay:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.turn = itertools.cycle(range(len(backends)))
        self.idle: dict[int, list[_Backend]] = {i: [] for i in range(len(backends))}
        self.tasks: set[asyncio.Future[None]] = set()

    async def backend(self) -> _Backend:
        index = next(self.turn)
        if self.idle[index]:
            return self.idle[index].pop()
        host, port = self.backends[index]
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: _Backend(index, self.idle), host, port)
        return protocol


async def _serve(port: int, backends: list[tuple[str, int]]) -> None:
    relay = _Relay(backends)
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(relay), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


async def _serve_aiohttp(port: int, backends: list[tuple[str, int]]) -> None:
    import aiohttp
    from aiohttp import web

    turn = itertools.cycle(backends)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, timeout=timeout
    ) as client:

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            host, backend_port = next(turn)
            upstream = await client.request(
                request.method,
                f"http://{host}:{backend_port}{request.raw_path}",
                data=body,
                headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
            )
            resp = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": upstream.headers.get("Content-Type", "")}
            )
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            upstream.release()
            return resp

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def main() -> None:
    args = sys.argv[1:]
    serve = _serve
    if args and args[0] == "--aiohttp":
        serve, args = _serve_aiohttp, args[1:]
    port = int(args[0])
    backends = [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in args[1:]]
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port, backends))
    else:
        uvloop.run(serve(port, backends))


if __name__ == "__main__":
    main()
