"""Forestall behind a gateway: Envoy + `forestall picker` beside Envoy alone, NGINX, HAProxy and `forestall balancer`.

Two measurements in one run, every proxy with one worker (Envoy `--concurrency 1`; the picker is one process):

1. Relay cost, as `bench.relay` measures it (same harness, `relay.measure`): closed-loop SSE streams on fast
   emulated backends at 200 and 1,000 concurrent streams; proxy CPU-seconds per 1,000 relayed chunks (for
   Envoy + picker: Envoy's CPU plus the picker's) and the time to first byte each proxy adds over a direct
   connection. The picker is asked once per request (request and response headers) and holds the ext_proc
   stream open to the end, but never sees a chunk: its CPU is per stream, not per chunk.
2. Balancing quality, as `bench.balance_quality` measures it (same backends, trace slice and load): TTFT on
   heterogeneous emulated GPUs under Azure LLM arrivals, every balancer told the capacity weights and
   nothing else (no stream caps).

Targets (issue 13): Envoy + picker CPU per 1,000 chunks <= 1.2x Envoy alone's at 200 and 1,000 streams; added
TTFT p99 at 1,000 streams <= 1.5x Envoy alone's added; TTFT p99 on the heterogeneous backends <= 0.5x NGINX
least_conn's with 0 failed streams. On this 2-core machine everything (backends, load generator, proxies)
shares the cores, so compare within the run.

    .venv/bin/python -m bench.gateway                   # full run, records the BENCHMARKS.md section
    .venv/bin/python -m bench.gateway --quick --no-record
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from bench import _proxies, _record, balance_quality, relay

RELAY_PROXIES = (
    "direct",
    "envoy least_request",
    "envoy + forestall picker",
    "envoy + null ext_proc (reference)",
    "nginx least_conn",
    "haproxy leastconn",
    "forestall",
)
QUALITY_PROXIES = (
    "nginx least_conn",
    "haproxy leastconn",
    "envoy least_request",
    "envoy + forestall picker",
    "envoy + forestall picker (scrape-metrics)",
    "forestall",
)
"""`(scrape-metrics)`: the picker as the gateway overlay runs it, reading each backend's own queue
(`vllm:num_requests_waiting`) from its /metrics every second: learned, not told."""
ENVOY, PICKER, NULL = "envoy least_request", "envoy + forestall picker", "envoy + null ext_proc (reference)"
"""`envoy + null ext_proc (reference)` is Envoy asking a do-nothing Python grpc.aio ext_proc server
(bench/_null_extproc.py): the floor of a Python picker, to tell gRPC's cost from the picking's."""


def _fmt(value: float | None, digits: int = 1) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def relay_rows(args: argparse.Namespace) -> dict[tuple[int, str], dict[str, Any]]:
    specs = [
        _proxies.BackendSpec(f"b{i}", slots=100_000, ttft_s=0.0, seconds_per_token=args.seconds_per_token)
        for i in range(args.backends)
    ]
    backends = _proxies.start_backends(specs)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    try:
        for _round in range(args.rounds):
            for concurrency in args.concurrency:
                for name in RELAY_PROXIES:
                    proxy = _proxies.make(name, backends)
                    try:
                        proxy.start()
                        row = relay.measure(proxy, args, concurrency)
                    except Exception as exc:  # a proxy that breaks is a figure too
                        row = {"error": f"failed: {exc}"[:200]}
                        print(proxy.log_tail(), file=sys.stderr)
                    finally:
                        proxy.stop()
                    runs.setdefault((concurrency, name), []).append(row)
                    print(f"{concurrency} streams {name}: {row}", file=sys.stderr, flush=True)
    finally:
        for backend in backends:
            _proxies.stop(backend.proc)
    return {key: relay.median_rows(value) for key, value in runs.items()}


def quality_rows(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    trace = balance_quality.TRACE
    arrivals, tokens = balance_quality.read_trace(trace, start_row=args.start_row, count=args.requests)
    capacity = balance_quality.decode_capacity_tokens_per_s(balance_quality.BACKENDS)
    scaled_s = float(tokens.sum()) / (args.load * capacity)
    scale = scaled_s / (float(arrivals[-1]) or 1.0)
    plan = [[float(t * scale), int(n)] for t, n in zip(arrivals, tokens, strict=True)]
    rows: dict[str, dict[str, Any]] = {}
    for name in args.quality_proxies:
        backends = _proxies.start_backends(balance_quality.BACKENDS)
        proxy = _proxies.make(name, backends)
        try:
            proxy.start()
            result = _proxies.run_loadgen({"mode": "replay", "target": proxy.targets[0], "arrivals": plan})
            rows[name] = balance_quality.summarize(result)
        except Exception as exc:
            rows[name] = {"error": f"failed: {exc}"[:200]}
            print(proxy.log_tail(), file=sys.stderr)
        finally:
            proxy.stop()
            for backend in backends:
                _proxies.stop(backend.proc)
        print(f"quality {name}: {rows[name]}", file=sys.stderr, flush=True)
    return rows, {"capacity": capacity, "scaled_s": scaled_s, "tokens": float(tokens.sum())}


def report(
    relay_table: dict[tuple[int, str], dict[str, Any]],
    quality: dict[str, dict[str, Any]],
    info: dict[str, float],
    args: argparse.Namespace,
) -> str:
    lines = [
        f"Relay cost: {args.backends} emulated backends (`ttft_s=0`, {args.seconds_per_token} s/token, no "
        f"queueing), closed loop, {round(args.tokens * 0.5)}-{round(args.tokens * 1.5)} tokens per stream, "
        f"warm-up {args.warmup_s} s, window {args.window_s} s, {args.rounds} round(s) (medians). Added TTFB = "
        "proxy percentile - direct percentile. Envoy + picker CPU = Envoy's process + the picker's.",
        "",
        "| streams | proxy | chunks/s | CPU-s / 1k chunks | CPU % | TTFB p50 ms | TTFB p99 ms | added p99 ms "
        "| failed | CPU vs Envoy alone | added p99 vs Envoy alone |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets = []
    for concurrency in args.concurrency:
        direct = relay_table.get((concurrency, "direct"), {})
        envoy = relay_table.get((concurrency, ENVOY), {})
        envoy_added = envoy.get("p99_ms", math.nan) - direct.get("p99_ms", math.nan)
        for name in RELAY_PROXIES:
            row = relay_table.get((concurrency, name))
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {concurrency} | {name} | {row['error']} |" + " |" * 8)
                continue
            added = row["p99_ms"] - direct.get("p99_ms", math.nan) if name != "direct" else math.nan
            cpu_ratio = row["cpu_per_1k"] / envoy.get("cpu_per_1k", math.nan)
            lines.append(
                f"| {concurrency} | {name} | {row['chunks_per_s']:.0f} | {_fmt(row['cpu_per_1k'], 4)} "
                f"| {_fmt(row['cpu_pct'])} | {_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | {_fmt(added)} "
                f"| {row['failed']} | {_fmt(cpu_ratio, 2)}x | {_fmt(added / envoy_added, 2)}x |"
            )
        picker = relay_table.get((concurrency, PICKER), {})
        if "cpu_per_1k" in picker and "cpu_per_1k" in envoy:
            ratio = picker["cpu_per_1k"] / envoy["cpu_per_1k"]
            targets.append(
                f"- {concurrency} streams: Envoy + picker CPU per chunk {ratio:.2f}x Envoy alone's (target <= 1.2x: "
                f"{'met' if ratio <= 1.2 else 'MISSED'})."
            )
            null = relay_table.get((concurrency, NULL), {})
            if "cpu_per_1k" in null:
                targets.append(
                    f"- {concurrency} streams: the picker costs {picker['cpu_per_1k'] / null['cpu_per_1k']:.2f}x a "
                    "do-nothing Python ext_proc server's CPU per chunk (Envoy included in both): the excess over "
                    "Envoy alone is gRPC in Python and Envoy's ext_proc, not the picking."
                )
            if concurrency == 1000:
                added = picker["p99_ms"] - direct.get("p99_ms", math.nan)
                if not envoy_added > 0:  # the direct row was slower than Envoy's: the run says nothing here
                    verdict = "not comparable: Envoy alone's added p99 is not positive (saturated machine)"
                else:
                    ratio = added / envoy_added
                    verdict = f"{ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'})"
                targets.append(
                    f"- 1000 streams: added TTFB p99 {added:.1f} ms vs Envoy alone's {envoy_added:.1f} ms: {verdict}."
                )
    lines += [
        "",
        f"Balancing quality: {', '.join(f'{s.name} {s.slots} slots' for s in balance_quality.BACKENDS)} "
        f"(weights = slots for all; decode capacity {info['capacity']:.0f} tokens/s); {args.requests} requests "
        f"of {balance_quality.TRACE.name} from row {args.start_row}, time-scaled to {info['scaled_s']:.0f} s "
        f"({args.load:.0%} of capacity). TTFT from connect to the first SSE event.",
        "",
        "| balancer | TTFT p50 ms | p90 ms | p99 ms | max ms | failed | share big/mid-a/mid-b/small | p99 vs NGINX lc |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    nginx = quality.get("nginx least_conn", {}).get("p99", math.nan)
    for name in args.quality_proxies:
        row = quality.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {name} | {row['error']} |" + " |" * 6)
            continue
        share = "/".join(f"{row['share'][s.name] * 100:.0f}%" for s in balance_quality.BACKENDS)
        lines.append(
            f"| {name} | {_fmt(row['p50'], 0)} | {_fmt(row['p90'], 0)} | {_fmt(row['p99'], 0)} "
            f"| {_fmt(row['max'], 0)} | {row['failed']} | {share} | {_fmt(row['p99'] / nginx, 2)}x |"
        )
    for name in (PICKER, f"{PICKER} (scrape-metrics)"):
        picker = quality.get(name, {})
        if "p99" in picker:
            ratio = picker["p99"] / nginx
            met = ratio <= 0.5 and picker["failed"] == 0
            targets.append(
                f"- heterogeneous backends, {name}: TTFT p99 {ratio:.2f}x NGINX least_conn's with "
                f"{picker['failed']} failed (target <= 0.5x, 0 failed: {'met' if met else 'MISSED'})."
            )
    lines += ["", "Targets (issue 13):", *targets]
    if args.note:
        lines += ["", *args.note]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[200, 1000], help="concurrent streams")
    parser.add_argument("--backends", type=int, default=4, help="emulated backends for the relay part")
    parser.add_argument("--tokens", type=int, default=100, help="mean tokens per stream (relay part)")
    parser.add_argument("--seconds-per-token", type=float, default=0.1, help="backend decode pace (relay)")
    parser.add_argument("--warmup-s", type=float, default=4.0, help="seconds before the window")
    parser.add_argument("--window-s", type=float, default=12.0, help="measurement window seconds")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the relay part; medians")
    parser.add_argument("--requests", type=int, default=600, help="trace requests (quality part)")
    parser.add_argument("--start-row", type=int, default=2000, help="first trace row (quality part)")
    parser.add_argument("--load", type=float, default=0.8, help="offered share of decode capacity")
    parser.add_argument("--skip-quality", action="store_true", help="relay part only")
    parser.add_argument("--skip-relay", action="store_true", help="balancing-quality part only")
    parser.add_argument(
        "--quality-proxies",
        nargs="+",
        default=list(QUALITY_PROXIES),
        choices=QUALITY_PROXIES,
        help="quality rows",
    )
    parser.add_argument("--quick", action="store_true", help="short windows, for trying the harness")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--note", action="append", default=[], help="a line to add under the tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.warmup_s, args.window_s, args.requests = 2.0, 4.0, 150
    _proxies.ensure_debian_package("nginx", "nginx-light")
    _proxies.ensure_debian_package("haproxy", "haproxy")
    relay_table = {} if args.skip_relay else relay_rows(args)
    quality: dict[str, dict[str, Any]] = {}
    info = {"capacity": math.nan, "scaled_s": math.nan, "tokens": math.nan}
    if not args.skip_quality and balance_quality.TRACE.exists():
        quality, info = quality_rows(args)
    table = report(relay_table, quality, info, args)
    print(table)
    if not args.no_record:
        _record.record("gateway", "Behind a gateway: Envoy + forestall picker (ext_proc)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
