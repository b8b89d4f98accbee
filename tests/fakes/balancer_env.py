"""Shared balancer fixtures: real loopback backends (emulated GPU servers and scripted misbehaving ones) and a
running balancer, plus small helpers to read its state.

Everything listens on 127.0.0.1 with port 0. `wait_until` polls a condition the test then asserts on; it bounds
the wait (a hang fails by name) and never asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from balancer import app as app_mod
from balancer import config as config_mod
from balancer.runtime import Balancer
from contract import clock as clock_mod
from emulation import worker as backend_emulator


async def start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve an aiohttp app on a free loopback port; returns the runner and `127.0.0.1:PORT`."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{runner.addresses[0][1]}"


@contextlib.asynccontextmanager
async def emulators(
    *specs: dict[str, Any], clock: clock_mod.Clock = clock_mod.SYSTEM
) -> AsyncIterator[list[str]]:
    """Emulated GPU backends, one per spec (`slots`, `ttft_s`, `seconds_per_token`); yields their addresses."""
    runners = []
    try:
        addresses = []
        for i, spec in enumerate(specs):
            app = backend_emulator.create_app(name=f"gpu-{i}", clock=clock, **spec)
            runner, address = await start_app(app)
            runners.append(runner)
            addresses.append(address)
        yield addresses
    finally:
        for runner in runners:
            await runner.cleanup()


class Running:
    """A balancer serving on loopback: `url`, `admin_url`, its `bal` state and `served` listeners."""

    def __init__(self, served: app_mod.Served, bal: Balancer) -> None:
        self.served = served
        self.bal = bal
        self.url = f"http://127.0.0.1:{served.port}"
        self.admin_url = f"http://127.0.0.1:{served.admin_port}"

    def active(self, address: str | None = None) -> int:
        backends = self.bal.pool.backends
        if address is not None:
            return backends[address].active if address in backends else 0
        return sum(b.active for b in backends.values())


@contextlib.asynccontextmanager
async def balancer(
    backends: list[str] | None = None,
    *,
    clock: clock_mod.Clock = clock_mod.SYSTEM,
    weights: dict[str, float] | None = None,
    **settings: Any,
) -> AsyncIterator[Running]:
    """A balancer in front of `backends` (inline, present at startup) with config `settings`."""
    specs = [{"address": a, "weight": (weights or {}).get(a, 1.0)} for a in backends or []]
    values: dict[str, Any] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "backends": specs}
    # Scraping is on by default in production; here a test that scrapes says so, because the scraper's
    # GET /metrics would otherwise reach the catch-all scripted backends and show up in what they record.
    values["scrape_metrics"] = False
    values.update(settings)
    config = config_mod.BalancerConfig.model_validate(values)
    bal = Balancer(config, clock=clock)
    apps = app_mod.create_apps(config, clock=clock, bal=bal)
    served = await app_mod.serve(config, clock=clock, apps=apps, shutdown_grace_s=1.0)
    try:
        yield Running(served, bal)
    finally:
        await served.close()


async def wait_until(condition: Callable[[], bool], *, what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` until true; fail naming `what` if it never becomes true."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  (state changes inside the balancer, no event to await)
            await asyncio.sleep(0.005)
    assert condition(), what


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE response, read to its end."""
    events = []
    async for line in resp.content:
        text = line.decode().rstrip("\r\n")
        if text.startswith("data:"):
            events.append(text[5:].strip())
    return events


def completion_body(*, tokens: int = 4, stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", "max_tokens": tokens, "stream": stream}


def write_backends(path: Path, backends: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"backends": backends}))


async def fetch_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def scripted_backend(handler: Handler) -> tuple[web.AppRunner, str]:
    """A backend whose every request is answered by `handler` (for misbehaviour the emulator lacks)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await start_app(app)


RawScript = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    """An HTTP/1.1 backend at the socket level: `script(connection_index, request_head, writer)` writes whatever
    bytes a test needs (odd splits, trailers, broken framing); requests without a body only. `connections` counts
    accepted connections and `requests` lists (connection_index, request_line)."""

    def __init__(self, script: RawScript) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.address = ""

    async def __aenter__(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                self.requests.append((index, head.split(b"\r\n", 1)[0]))
                await self.script(index, head, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
