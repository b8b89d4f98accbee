"""Memory a balancer holds per open stream and per MCP session, beside NGINX and HAProxy.

Idle streams: emulated backends (`emulation.worker`) send the first token at once and the next an hour
later, so each stream is open, past its headers, and idle. The load generator (`emulation.loadgen idle`, its own
process) opens `--streams` of them through the balancer in two equal steps; the balancer's resident set (VmRSS of
all its processes) is read before and after each step, and the figure is the growth per 1,000 streams.

MCP sessions: one real MCP server from the `mcp` SDK (Streamable HTTP, stateful sessions, served by uvicorn)
behind the balancer; `--sessions` sessions are opened with raw Streamable HTTP requests (`initialize`, then the
`notifications/initialized` notification carrying the `Mcp-Session-Id` the server gave, which must get 202), over
a pool of 50 keep-alive connections, and left open (no GET stream, no DELETE). The figure is the balancer's RSS
growth per 1,000 sessions. NGINX and HAProxy keep no per-session state (they do not know MCP), so theirs is the
cost of the traffic only; Forestall remembers each session's backend.

RSS is what the kernel reports after the step settles (1 s); Python's allocator keeps freed memory, so a step
can also show growth from buffers used during the step. Figures within ~1 MB are noise.

    .venv/bin/python -m bench.balancer_memory                 # records the BENCHMARKS.md section
    .venv/bin/python -m bench.balancer_memory --streams 400 --sessions 200 --no-record
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench import _proxies, _record
from emulation import processes

PROXIES = ("nginx least_conn", "haproxy leastconn", "forestall")
MCP_PROTOCOL_VERSION = "2025-06-18"
"""A protocol version with Streamable HTTP sessions (the server answers `initialize` with an Mcp-Session-Id)."""
SETTLE_S = 1.0
"""Pause before reading RSS after a step, so buffers of the step's traffic are released."""


def serve_mcp(port: int) -> None:
    """Run the MCP SDK's own Streamable HTTP server on 127.0.0.1:`port` (the benchmark's MCP backend)."""
    import uvicorn
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("bench", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text (a tool so the server is a realistic one)."""
        return text

    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning")


def start_mcp_backend() -> tuple[subprocess.Popen[bytes], int]:
    port = processes.free_port()
    proc = subprocess.Popen(
        [_proxies.PYTHON, "-m", "bench.balancer_memory", "--serve-mcp", str(port)], cwd=_proxies.ROOT
    )
    _proxies.wait_listening(port, proc, "MCP server")
    return proc, port


async def open_sessions(target: tuple[str, int], count: int) -> dict[str, int]:
    """Open `count` MCP sessions through `target`; returns how many completed the handshake."""
    import aiohttp

    url = f"http://{target[0]}:{target[1]}/mcp"
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": MCP_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "forestall-bench", "version": "0"},
        },
    }
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    counts = {"ok": 0, "no_session_id": 0, "bad_status": 0}

    async def one(client: aiohttp.ClientSession) -> None:
        async with client.post(url, json=initialize, headers=headers) as resp:
            body = await resp.read()
            session_id = resp.headers.get("Mcp-Session-Id")
        if resp.status != 200 or b'"result"' not in body:
            counts["bad_status"] += 1
            return
        if not session_id:
            counts["no_session_id"] += 1
            return
        more = {**headers, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": MCP_PROTOCOL_VERSION}
        async with client.post(url, json=initialized, headers=more) as resp:
            await resp.read()
            counts["ok" if resp.status == 202 else "bad_status"] += 1

    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        semaphore = asyncio.Semaphore(50)

        async def guarded() -> None:
            async with semaphore:
                await one(client)

        async with asyncio.timeout(300):
            await asyncio.gather(*(guarded() for _ in range(count)))
    return counts


def _rss_mb(pid: int) -> float:
    time.sleep(SETTLE_S)
    return _proxies.rss_bytes(pid) / 2**20


def measure_streams(name: str, count: int) -> dict[str, Any]:
    specs = [
        _proxies.BackendSpec(f"idle{i}", slots=100_000, ttft_s=0.0, seconds_per_token=3600.0)
        for i in range(2)
    ]
    backends = _proxies.start_backends(specs)
    proxy = _proxies.make(name, backends)
    holders: list[_proxies.IdleStreams] = []
    try:
        proxy.start()
        assert proxy.pid is not None
        warm = _proxies.IdleStreams(
            proxy.targets[0], 20
        )  # first streams allocate pools every later one reuses
        warm.close()
        rss = [_rss_mb(proxy.pid)]
        opened = 0
        for _ in range(2):
            holder = _proxies.IdleStreams(proxy.targets[0], count // 2)
            holders.append(holder)
            opened += holder.opened["opened"]
            rss.append(_rss_mb(proxy.pid))
        per_1k = (rss[-1] - rss[0]) / max(1, opened) * 1000
        return {"rss_mb": rss, "opened": opened, "per_1k_mb": per_1k}
    finally:
        for holder in holders:
            holder.close()
        proxy.stop()
        for backend in backends:
            _proxies.stop(backend.proc)


def measure_sessions(name: str, count: int) -> dict[str, Any]:
    mcp_proc, mcp_port = start_mcp_backend()
    fake = _proxies.BackendSpec("mcp", slots=1, ttft_s=0.0, seconds_per_token=0.0)
    backends = [_proxies.Backend(fake, mcp_port, mcp_proc)]  # type: ignore[arg-type]
    proxy = _proxies.make(name, backends)
    try:
        proxy.start()
        assert proxy.pid is not None
        warm = asyncio.run(open_sessions(proxy.targets[0], 20))
        rss0 = _rss_mb(proxy.pid)
        counts = asyncio.run(open_sessions(proxy.targets[0], count))
        rss1 = _rss_mb(proxy.pid)
        open_in_signals = None
        if isinstance(proxy, _proxies.Forestall):
            url = f"http://127.0.0.1:{proxy.admin_port}/signals"
            with urllib.request.urlopen(url, timeout=10) as resp:
                signals = json.load(resp)
            open_in_signals = sum(b["open_sessions"] for b in signals["backends"])
        per_1k = (rss1 - rss0) / counts["ok"] * 1000 if counts["ok"] else float("nan")
        return {
            "rss_mb": [rss0, rss1],
            "counts": counts,
            "warm": warm,
            "per_1k_mb": per_1k,
            "signals": open_in_signals,
        }
    finally:
        proxy.stop()
        _proxies.stop(mcp_proc)


def report(
    streams: dict[str, Any], sessions: dict[str, Any], args: argparse.Namespace, notes: list[str]
) -> str:
    lines = [
        f"Idle streams: {args.streams} through each balancer (two steps of {args.streams // 2}) to 2 emulated "
        "backends; MCP: "
        f"{args.sessions} sessions (initialize + notifications/initialized, left open) to one `mcp` SDK server. "
        "RSS = VmRSS of all the balancer's processes, one worker each.",
        "",
        "| balancer | RSS before MB | after streams MB | streams open | MB per 1k idle streams "
        "| RSS before MB | after sessions MB | sessions ok | MB per 1k MCP sessions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.proxies:
        s, m = streams.get(name, {}), sessions.get(name, {})
        if "error" in s:
            left = f"{s['error']} | | | |"
        else:
            left = f"{s['rss_mb'][0]:.1f} | {s['rss_mb'][-1]:.1f} | {s['opened']} | {s['per_1k_mb']:.2f}"
        if "error" in m:
            right = f"{m['error']} | | |"
        else:
            failed = {k: v for k, v in m["counts"].items() if k != "ok" and v}
            ok = f"{m['counts']['ok']}" + (f" (failed: {failed})" if failed else "")
            right = f"{m['rss_mb'][0]:.1f} | {m['rss_mb'][1]:.1f} | {ok} | {m['per_1k_mb']:.2f}"
        lines.append(f"| {name} | {left} | {right} |")
    fs = sessions.get("forestall", {})
    if fs.get("signals") is not None:
        lines.append(f"\nForestall's /signals reported {fs['signals']} open sessions after the step.")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.balancer_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--streams", type=int, default=2000, help="idle streams to hold open (default 2000)")
    parser.add_argument("--sessions", type=int, default=1000, help="MCP sessions to open (default 1000)")
    parser.add_argument(
        "--proxies", nargs="+", default=list(PROXIES), choices=PROXIES, help="what to measure"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--note", action="append", default=[], help="a line to add under the table")
    parser.add_argument("--serve-mcp", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_mcp:
        serve_mcp(args.serve_mcp)
        return 0
    notes = list(args.note)
    if "forestall" in args.proxies and not _proxies.forestall_available():
        notes.append("Forestall: `forestall balancer` was not available in this tree when this ran.")
        args.proxies = [p for p in args.proxies if p != "forestall"]
    streams: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    for name in args.proxies:
        for kind, table, measure, count in (
            ("streams", streams, measure_streams, args.streams),
            ("sessions", sessions, measure_sessions, args.sessions),
        ):
            try:
                table[name] = measure(name, count)
            except Exception as exc:  # a balancer that breaks is a figure too
                table[name] = {"error": f"failed: {exc}"[:160]}
            print(f"{name} {kind}: {table[name]}", file=sys.stderr, flush=True)
    text = report(streams, sessions, args, notes)
    print(text)
    if not args.no_record:
        _record.record(
            "balancer_memory", "Memory: RSS per 1,000 idle streams and per 1,000 MCP sessions", text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
