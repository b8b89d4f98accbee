"""What an abusive client can make the balancer hold: memory for one huge WebSocket message, descriptors for
trickled headers, with the limits the security review asked for beside settings that disable them.

- WebSocket: a client sends one `--ws-mib` MiB binary message through `forestall balancer` to an echo backend.
  The figure is the growth of the balancer's peak resident set (VmHWM) over its level before the message. With
  `ws_max_message_bytes` at its default (4 MiB) the message is refused (close 1009) before it is buffered;
  with the cap raised above the message size (what the review measured: 111 MB for 50 MiB) it is buffered
  whole on the way in and again on the way out.
- Slowloris: `--slow` connections each send the start of a request head and then nothing. The figure is the
  balancer's open descriptors (/proc/PID/fd) just after they connected and 2 s after the header deadline
  (`header_timeout_s` = 1 s), beside a run whose header deadline is an hour (what a listener without one
  does), and a run with `max_connections_per_ip` = 100 (the per-address cap turns the rest away at once).

The backend is an aiohttp WebSocket echo in this process; only the balancer's process is measured.

    PYTHONPATH=$PWD .venv/bin/python -m bench.balancer_limits                 # records the BENCHMARKS.md section
    PYTHONPATH=$PWD .venv/bin/python -m bench.balancer_limits --no-record
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench import _proxies, _record

COMMAND = ".venv/bin/python -m bench.balancer_limits"
"""Recorded with the figures (in a worktree without its own .venv: PYTHONPATH=$PWD and the shared venv)."""
SETTLE_S = 1.0
"""Pause before reading the process figures, so the step's effects have landed."""


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class _Balancer(_proxies.Proxy):
    """`forestall balancer` from this tree (python -m forestall), with extra `--set` settings."""

    def __init__(self, backend: str, settings: dict[str, Any]) -> None:
        super().__init__([])
        self.backend = backend
        self.settings = settings
        self.label = "forestall " + " ".join(f"{k}={v}" for k, v in settings.items())

    def start(self) -> _Balancer:
        self.port = _proxies.free_port()
        (self.dir / "backends.json").write_text(json.dumps({"backends": [{"address": self.backend}]}))
        sets = [arg for k, v in self.settings.items() for arg in ("--set", f"{k}={v}")]
        self._launch(
            [_proxies.PYTHON, "-m", "forestall", "balancer", "--listen", f"127.0.0.1:{self.port}",
             "--admin-listen", f"127.0.0.1:{_proxies.free_port()}",
             "--backends-file", str(self.dir / "backends.json"), *sets]
        )  # fmt: skip
        return self


async def _echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def _websocket_peak_mib(backend: str, *, mib: int, cap_bytes: int) -> tuple[float, str]:
    proxy = _Balancer(backend, {"ws_max_message_bytes": cap_bytes}).start()
    try:
        assert proxy.pid is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{proxy.port}/v1/realtime"
            async with http.ws_connect(url, max_msg_size=0) as ws:
                await asyncio.sleep(SETTLE_S)
                before = _status_kib(proxy.pid, "VmRSS")
                try:
                    await ws.send_bytes(b"x" * (mib * 1024 * 1024))
                    msg = await ws.receive()
                    outcome = f"closed {msg.data}" if msg.type is aiohttp.WSMsgType.CLOSE else "echoed"
                except (ConnectionError, aiohttp.ClientError):
                    outcome = f"closed {ws.close_code or 1009} while sending"
        await asyncio.sleep(SETTLE_S)
        return (_status_kib(proxy.pid, "VmHWM") - before) / 1024, outcome
    finally:
        proxy.stop()


def _slowloris(backend: str, *, count: int, settings: dict[str, Any]) -> tuple[int, int]:
    proxy = _Balancer(backend, {"header_timeout_s": 1.0, **settings}).start()
    sockets: list[socket.socket] = []
    try:
        assert proxy.pid is not None
        baseline = _fds(proxy.pid)
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", proxy.port))
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sockets.append(sock)
        time.sleep(SETTLE_S)
        held = _fds(proxy.pid) - baseline
        time.sleep(2.0)
        return held, _fds(proxy.pid) - baseline
    finally:
        for sock in sockets:
            sock.close()
        proxy.stop()


async def _run(args: argparse.Namespace) -> str:
    app = web.Application()
    app.router.add_get("/v1/realtime", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend = f"127.0.0.1:{runner.addresses[0][1]}"
    rows = ["| case | setting | result | balancer growth |", "|---|---|---|---|"]
    try:
        for cap in (4 * 1024 * 1024, (args.ws_mib + 1) * 1024 * 1024):
            peak, outcome = await _websocket_peak_mib(backend, mib=args.ws_mib, cap_bytes=cap)
            rows.append(
                f"| one {args.ws_mib} MiB WebSocket message | ws_max_message_bytes = {cap // 1048576} MiB "
                f"| {outcome} | peak RSS +{peak:.0f} MiB |"
            )
        for label, settings in (
            ("header_timeout_s = 1 s", {}),
            ("header_timeout_s = 1 h (no deadline)", {"header_timeout_s": 3600.0}),
            ("max_connections_per_ip = 100", {"header_timeout_s": 3600.0, "max_connections_per_ip": 100}),
        ):
            held, after = await asyncio.to_thread(_slowloris, backend, count=args.slow, settings=settings)
            rows.append(
                f"| {args.slow} connections trickling headers | {label} | descriptors held: {held} at once, "
                f"{after} 3 s later | |"
            )
    finally:
        await runner.cleanup()
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ws-mib", type=int, default=50, help="size of the one WebSocket message (MiB)")
    parser.add_argument("--slow", type=int, default=300, help="connections that trickle their headers")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    table = asyncio.run(_run(args))
    print(table)
    if not args.no_record:
        _record.record(
            "balancer-limits",
            "Balancer limits: what one abusive client can make it hold",
            table
            + "\n\nPeak RSS growth is VmHWM after the message minus VmRSS before it; descriptors are the "
            "balancer's open fds above its idle level.",
            command=COMMAND,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
