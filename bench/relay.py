"""Data-plane cost of the balancer beside NGINX and HAProxy: CPU per relayed chunk and added time to first byte.

One run, the same emulated backends (`emulation.worker`, no queueing: slots far above the load,
`ttft_s = 0` so the time to first byte is all transport), the same closed-loop load from `emulation.loadgen` in its
own process: `concurrency` clients, each streaming about `--tokens` tokens (0.5x-1.5x, uniform) at `--seconds-per-token` back to back over a
keep-alive connection. Measured for a direct connection (clients spread over the backends), NGINX `least_conn`,
NGINX round robin, HAProxy `balance leastconn` and `forestall balancer`, one worker each.

Figures, over a measurement window after a warm-up:
- proxy CPU-seconds per 1,000 relayed chunks (an SSE event is a chunk; utime + stime of all the proxy's
  processes from /proc), and the proxy's CPU use in percent of one core;
- time to first byte (first SSE event) p50 and p99, and what each proxy adds over the direct connection at the
  same percentile;
- relay capacity: chunks per CPU-second of the proxy (1,000 / the CPU per 1,000 chunks), i.e. the rate one
  process would relay at 100 % of a core if its cost per chunk stayed as measured, beside the rate it actually
  relayed and its CPU use at the highest concurrency.

Targets (issue 12): CPU per chunk <= 1.5x NGINX least_conn's at 200 and 1,000 streams; at 1,000 streams also
relayed chunks/s >= 0.9x NGINX least_conn's and added p99 <= 2x NGINX least_conn's added p99. On a 2-core machine 1,000 streams saturate everything (backends, load generator and proxy
share the cores), so compare within the run, not to absolute figures.

    .venv/bin/python -m bench.relay                 # full run, records the BENCHMARKS.md section
    .venv/bin/python -m bench.relay --quick --no-record
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np

from bench import _proxies, _record

PROXIES = ("direct", "nginx least_conn", "nginx round robin", "haproxy leastconn", "forestall")
REFERENCE_RELAYS = _proxies.REFERENCE_RELAYS
"""Opt-in rows (`--reference-relay`): `bench._reference_relay`, to separate Python's cost from aiohttp's."""
REFERENCE = "nginx least_conn"
"""What the targets compare to."""


def measure(proxy: _proxies.Proxy, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    """One closed-loop run through `proxy`; CPU counters are read as the load generator opens/closes its window."""
    marks: dict[str, tuple[float, float]] = {}

    def on_event(message: dict[str, Any]) -> None:
        cpu = proxy.cpu_seconds() if proxy.pid is not None else 0.0
        marks[message["event"]] = (cpu, time.monotonic())

    result = _proxies.run_loadgen(
        {
            "mode": "closed",
            "targets": proxy.targets,
            "concurrency": concurrency,
            "warmup_s": args.warmup_s,
            "window_s": args.window_s,
            "max_tokens": args.tokens,
            "max_tokens_range": [round(args.tokens * 0.5), round(args.tokens * 1.5)],
        },
        on_event,
    )
    (cpu0, t0), (cpu1, t1) = marks["window_start"], marks["window_end"]
    events = result["events"]
    ttfb_ms = np.array(result["ttfb_s"]) * 1000.0
    cpu_s = cpu1 - cpu0
    return {
        "chunks_per_s": events / result["window_s"],
        "cpu_per_1k": cpu_s / events * 1000.0 if events and proxy.pid is not None else math.nan,
        "cpu_pct": cpu_s / (t1 - t0) * 100.0 if proxy.pid is not None else math.nan,
        "p50_ms": float(np.percentile(ttfb_ms, 50)) if len(ttfb_ms) else math.nan,
        "p99_ms": float(np.percentile(ttfb_ms, 99)) if len(ttfb_ms) else math.nan,
        "ok": result["streams_ok"],
        "failed": result["streams_failed"],
        "errors": result["errors"],
        "loadgen_cpu_pct": result["loadgen_cpu_s"] / (args.warmup_s + args.window_s) * 100.0,
    }


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def report(rows: dict[tuple[int, str], dict[str, Any]], args: argparse.Namespace, notes: list[str]) -> str:
    lines = [
        f"Load: {args.backends} emulated backends (`ttft_s=0`, {args.seconds_per_token} s/token, no queueing); "
        f"closed loop, each client streams {round(args.tokens * 0.5)}-{round(args.tokens * 1.5)} tokens per "
        f"request (uniform; the Azure conversation trace's median is 129) back to back on a keep-alive connection; warm-up {args.warmup_s} s, window {args.window_s} s, {args.rounds} round(s), each round "
        "measuring every proxy in turn; figures are medians over rounds. One worker per proxy. Chunk = one SSE "
        "event. Added TTFB = proxy percentile − direct percentile (time to first event, measured at the client).",
        "",
        "| streams | proxy | chunks/s | proxy CPU-s / 1k chunks | proxy CPU % | TTFB p50 ms | TTFB p99 ms "
        "| added p50 ms | added p99 ms | failed | CPU vs NGINX lc | added p99 vs NGINX lc |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for concurrency in args.concurrency:
        direct = rows.get((concurrency, "direct"))
        ref = rows.get((concurrency, REFERENCE))
        for name in args.proxies:
            row = rows.get((concurrency, name))
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {concurrency} | {name} | {row['error']} |" + " |" * 10)
                continue
            added50 = row["p50_ms"] - direct["p50_ms"] if direct and name != "direct" else math.nan
            added99 = row["p99_ms"] - direct["p99_ms"] if direct and name != "direct" else math.nan
            row["added99"] = added99
            cpu_ratio = row["cpu_per_1k"] / ref["cpu_per_1k"] if ref and "error" not in ref else math.nan
            ref_added99 = (
                ref["p99_ms"] - direct["p99_ms"] if ref and direct and "error" not in ref else math.nan
            )
            p99_ratio = added99 / ref_added99 if ref_added99 and ref_added99 > 0 else math.nan
            lines.append(
                f"| {concurrency} | {name} | {row['chunks_per_s']:.0f} | {_fmt(row['cpu_per_1k'], 4)} "
                f"| {_fmt(row['cpu_pct'])} | {_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | {_fmt(added50)} "
                f"| {_fmt(added99)} | {row['failed']} | {_fmt(cpu_ratio, 2)}x | {_fmt(p99_ratio, 2)}x |"
            )
            if name == "forestall":
                rate_ratio = (
                    row["chunks_per_s"] / ref["chunks_per_s"] if ref and "error" not in ref else math.nan
                )
                verdicts.append(
                    f"- {concurrency} streams: CPU per chunk {_fmt(cpu_ratio, 2)}x NGINX least_conn's (target <= 1.5x: "
                    f"{'met' if cpu_ratio <= 1.5 else 'MISSED'}); relayed chunks/s {_fmt(rate_ratio, 2)}x NGINX's "
                    f"(target at 1,000 streams >= 0.9x: {'met' if rate_ratio >= 0.9 else 'MISSED'}); "
                    f"added p99 {_fmt(added99)} ms vs NGINX's "
                    f"{_fmt(ref_added99)} ms = {_fmt(p99_ratio, 2)}x (target <= 2x: "
                    f"{'met' if (p99_ratio <= 2 or added99 <= 0) else 'MISSED'})."
                )
    top = max(args.concurrency)
    lines += [
        "",
        f"Relay capacity per core (at {top} streams): chunks per CPU-second of the proxy = 1,000 / (CPU-s per "
        "1k chunks); the rate one process would relay at 100 % of a core at the measured cost per chunk. The "
        "machine runs out of cores (backends and load generator) before NGINX or HAProxy get near one core, so "
        "this is an extrapolation for them; the measured rate and CPU use are beside it.",
        "",
        "| proxy | chunks per CPU-second | relayed chunks/s | proxy CPU % of one core |",
        "|---|---:|---:|---:|",
    ]
    for name in args.proxies:
        row = rows.get((top, name))
        if name == "direct" or row is None or "error" in row:
            continue
        lines.append(
            f"| {name} | {_fmt(1000.0 / row['cpu_per_1k'], 0)} | {row['chunks_per_s']:.0f} | {_fmt(row['cpu_pct'])} |"
        )
    if verdicts:
        lines += ["", "Targets for Forestall:", *verdicts]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def median_rows(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    out: dict[str, Any] = {}
    for key in ("chunks_per_s", "cpu_per_1k", "cpu_pct", "p50_ms", "p99_ms", "loadgen_cpu_pct"):
        out[key] = float(np.median([r[key] for r in good]))
    out["ok"] = sum(r["ok"] for r in good)
    out["failed"] = sum(r["failed"] for r in good)
    out["errors"] = {k: v for r in good for k, v in r["errors"].items()}
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[200, 1000], help="concurrent streams")
    parser.add_argument(
        "--proxies", nargs="+", default=list(PROXIES), choices=PROXIES, help="what to measure"
    )
    parser.add_argument("--backends", type=int, default=4, help="emulated backends (default 4)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=100,
        help="mean tokens per stream, drawn uniformly from 0.5x to 1.5x (default 100, near the Azure trace's median)",
    )
    parser.add_argument(
        "--seconds-per-token", type=float, default=0.1, help="backend decode pace (default 0.1)"
    )
    parser.add_argument("--warmup-s", type=float, default=4.0, help="seconds before the window (default 4)")
    parser.add_argument(
        "--window-s", type=float, default=12.0, help="measurement window seconds (default 12)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement; medians (default 1)")
    parser.add_argument(
        "--reference-relay",
        action="store_true",
        help="also measure bench._reference_relay: a protocol-level Python relay and a bare aiohttp relay",
    )
    parser.add_argument("--quick", action="store_true", help="short windows, for trying the harness")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--note", action="append", default=[], help="a line to add under the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.warmup_s, args.window_s = 2.0, 4.0
    notes = list(args.note)
    if args.reference_relay:
        args.proxies = [*args.proxies, *REFERENCE_RELAYS]
    if "forestall" in args.proxies and not _proxies.forestall_available():
        notes.append("Forestall: `forestall balancer` was not available in this tree when this ran.")
        args.proxies = [p for p in args.proxies if p != "forestall"]
    for name in args.proxies:  # install NGINX/HAProxy before anything is timed
        if name.startswith("nginx"):
            _proxies.ensure_debian_package("nginx", "nginx-light")
        if name.startswith("haproxy"):
            _proxies.ensure_debian_package("haproxy", "haproxy")
    specs = [
        _proxies.BackendSpec(f"b{i}", slots=100_000, ttft_s=0.0, seconds_per_token=args.seconds_per_token)
        for i in range(args.backends)
    ]
    backends = _proxies.start_backends(specs)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    try:
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for name in args.proxies:
                    proxy = _proxies.make(name, backends)
                    try:
                        proxy.start()
                        row = measure(proxy, args, concurrency)
                    except Exception as exc:  # a proxy that breaks is a figure too, not the end of the run
                        row = {"error": f"failed: {exc}"[:200]}
                        print(proxy.log_tail(), file=sys.stderr)
                    finally:
                        proxy.stop()
                    runs.setdefault((concurrency, name), []).append(row)
                    print(
                        f"round {round_ + 1} {concurrency} streams {name}: {row}", file=sys.stderr, flush=True
                    )
    finally:
        for backend in backends:
            _proxies.stop(backend.proc)
    rows = {key: median_rows(value) for key, value in runs.items()}
    table = report(rows, args, notes)
    print(table)
    if not args.no_record:
        _record.record("relay", "Data-plane cost: CPU per relayed chunk and added time to first byte", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
