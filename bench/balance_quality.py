"""Balancing quality: time to first token on heterogeneous GPU backends under a real arrival trace.

Backends differ as GPU pods do (`emulation.worker` processes): a big fast one, two mid ones and a small
slow one, each with its own slot count (batch), prefill time and time per token. Every balancer gets the same
information, the backend addresses with capacity weights equal to their slot counts (NGINX `weight=`, HAProxy
`weight`, Forestall's backends file). Arrivals and output lengths come from a slice of the Azure LLM inference
trace (`/work/shared/data/AzureLLMInferenceTrace_conv.csv`, column GeneratedTokens = tokens streamed), with time
scaled so the offered tokens are `--load` (default 80 %) of what the backends can decode per second (sum of
slots / seconds-per-token). Each request is one SSE stream on a fresh connection, replayed at its time by
`emulation.loadgen` in its own process; time to first token is measured at the client, from connect to the first
SSE event, so it includes queueing at the backend (beyond its slots) or in the balancer.

Rows: NGINX `least_conn`, NGINX round robin (weighted), HAProxy `balance leastconn` and Forestall with their
default settings; and, as extras, each side's own way of knowing a backend's capacity: HAProxy `maxconn = slots`
per server (HAProxy queues the rest) and Forestall `max_streams = slots` per backend (its admission queue).

Target (issue 12): Forestall's TTFT p99 <= 0.5x NGINX least_conn's with zero failed streams, capacity not told
(the `forestall` row: weights only; it reads the emulated backends' vLLM metrics, on by default).

    .venv/bin/python -m bench.balance_quality               # records the BENCHMARKS.md section
    .venv/bin/python -m bench.balance_quality --requests 150 --no-record
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench import _proxies, _record

TRACE = _proxies.ROOT.parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"

BACKENDS = (
    _proxies.BackendSpec("big-fast", slots=16, ttft_s=0.05, seconds_per_token=0.015, weight=16),
    _proxies.BackendSpec("mid-a", slots=8, ttft_s=0.08, seconds_per_token=0.025, weight=8),
    _proxies.BackendSpec("mid-b", slots=8, ttft_s=0.08, seconds_per_token=0.025, weight=8),
    _proxies.BackendSpec("small-slow", slots=4, ttft_s=0.15, seconds_per_token=0.04, weight=4),
)
"""Heterogeneous pods: decode capacity 1067 + 320 + 320 + 100 tokens/s; weights are the slot counts."""

PROXIES = (
    "nginx least_conn",
    "nginx round robin",
    "haproxy leastconn",
    "forestall",
    "haproxy leastconn (maxconn = slots)",
    "forestall (max_streams = slots)",
)


def read_trace(path: Path, *, start_row: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times (seconds from the first of the slice) and generated tokens of `count` requests."""
    times, tokens = [], []
    with path.open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if i < start_row:
                continue
            if len(times) >= count:
                break
            stamp, _, fraction = row["TIMESTAMP"].partition(".")
            when = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
            times.append(when.timestamp() + float("0." + (fraction or "0")))
            tokens.append(max(1, int(row["GeneratedTokens"])))
    if len(times) < count:
        raise ValueError(f"{path} has only {len(times)} requests from row {start_row}, {count} asked")
    arrivals = np.array(times) - times[0]
    return arrivals, np.array(tokens)


def decode_capacity_tokens_per_s(specs: tuple[_proxies.BackendSpec, ...]) -> float:
    return sum(s.slots / s.seconds_per_token for s in specs)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    streams = result["streams"]
    ok = [s for s in streams if s["ok"]]
    ttft_ms = np.array([s["ttft_s"] for s in ok]) * 1000.0
    share = Counter(s["backend"] for s in ok)
    pct = dict.fromkeys(("p50", "p90", "p99", "max"), math.nan)
    if len(ttft_ms):
        pct = {
            "p50": float(np.percentile(ttft_ms, 50)),
            "p90": float(np.percentile(ttft_ms, 90)),
            "p99": float(np.percentile(ttft_ms, 99)),
            "max": float(ttft_ms.max()),
        }
    errors = Counter(s["error"][:60] or "incomplete" for s in streams if not s["ok"])
    return {
        **pct,
        "mean": float(ttft_ms.mean()) if len(ttft_ms) else math.nan,
        "ok": len(ok),
        "failed": len(streams) - len(ok),
        "errors": dict(errors),
        "share": {spec.name: share.get(spec.name, 0) / max(1, len(ok)) for spec in BACKENDS},
        "duration_s": result["duration_s"],
    }


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def report(
    rows: dict[str, dict[str, Any]], args: argparse.Namespace, info: dict[str, float], notes: list[str]
) -> str:
    backends = ", ".join(
        f"{s.name}: {s.slots} slots, TTFT {s.ttft_s * 1000:.0f} ms, {s.seconds_per_token * 1000:.0f} ms/token"
        for s in BACKENDS
    )
    lines = [
        f"Backends: {backends}; weights = slots for every balancer. Decode capacity "
        f"{info['capacity']:.0f} tokens/s.",
        f"Trace: {TRACE.name} rows {args.start_row}..{args.start_row + args.requests - 1} ({args.requests} "
        f"requests, {info['tokens']:.0f} output tokens, mean {info['tokens'] / args.requests:.0f}; originally "
        f"{info['span_s']:.0f} s), time-scaled x{info['scale']:.3f} to {info['scaled_s']:.0f} s so the offered "
        f"load is {args.load:.0%} of the decode capacity. One stream per request, fresh connection; TTFT from "
        "connect to the first SSE event. No direct-connection row: without a balancer a client would have to "
        "choose the backend itself; NGINX round robin is the baseline that ignores load.",
        "",
        "| balancer | TTFT p50 ms | p90 ms | p99 ms | max ms | mean ms | failed | share big/mid-a/mid-b/small "
        "| p99 vs NGINX lc | p99 vs HAProxy lc |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    nginx = rows.get("nginx least_conn", {}).get("p99", math.nan)
    haproxy = rows.get("haproxy leastconn", {}).get("p99", math.nan)
    for name in args.proxies:
        row = rows.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {name} | {row['error']} |" + " |" * 8)
            continue
        share = "/".join(f"{row['share'][s.name] * 100:.0f}%" for s in BACKENDS)
        lines.append(
            f"| {name} | {_fmt(row['p50'])} | {_fmt(row['p90'])} | {_fmt(row['p99'])} | {_fmt(row['max'])} "
            f"| {_fmt(row['mean'])} | {row['failed']} | {share} | {_fmt(row['p99'] / nginx, 2)}x "
            f"| {_fmt(row['p99'] / haproxy, 2)}x |"
        )
    for name in ("forestall", "forestall (max_streams = slots)"):
        row = rows.get(name)
        if row is None or "error" in row:
            continue
        vs_nginx, vs_haproxy = row["p99"] / nginx, row["p99"] / haproxy
        met = vs_nginx <= 0.5 and row["failed"] == 0
        lines.append(
            f"\nTarget, {name}: TTFT p99 {vs_nginx:.2f}x NGINX least_conn's (<= 0.5x), {row['failed']} failed "
            f"streams (0): {'met' if met else 'MISSED'}. Beside HAProxy leastconn: {vs_haproxy:.2f}x."
        )
    failures = {name: row["errors"] for name, row in rows.items() if row.get("errors")}
    if failures:
        lines.append(f"\nFailures by balancer: {failures}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.balance_quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--requests", type=int, default=600, help="requests replayed from the trace (default 600)"
    )
    parser.add_argument(
        "--start-row", type=int, default=2000, help="first trace row of the slice (default 2000)"
    )
    parser.add_argument(
        "--load", type=float, default=0.8, help="offered share of decode capacity (default 0.8)"
    )
    parser.add_argument(
        "--proxies", nargs="+", default=list(PROXIES), choices=PROXIES, help="what to measure"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--note", action="append", default=[], help="a line to add under the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not TRACE.exists():
        print(f"the trace {TRACE} is missing; see /work/shared/data/README", file=sys.stderr)
        return 1
    notes = list(args.note)
    if any(p.startswith("forestall") for p in args.proxies) and not _proxies.forestall_available():
        notes.append("Forestall: `forestall balancer` was not available in this tree when this ran.")
        args.proxies = [p for p in args.proxies if not p.startswith("forestall")]
    for name in args.proxies:
        if name.startswith("nginx"):
            _proxies.ensure_debian_package("nginx", "nginx-light")
        if name.startswith("haproxy"):
            _proxies.ensure_debian_package("haproxy", "haproxy")
    arrivals, tokens = read_trace(TRACE, start_row=args.start_row, count=args.requests)
    capacity = decode_capacity_tokens_per_s(BACKENDS)
    scaled_s = float(tokens.sum()) / (args.load * capacity)
    span_s = float(arrivals[-1]) or 1.0
    scale = scaled_s / span_s
    info = {
        "capacity": capacity,
        "tokens": float(tokens.sum()),
        "span_s": span_s,
        "scale": scale,
        "scaled_s": scaled_s,
    }
    plan = [[float(t * scale), int(n)] for t, n in zip(arrivals, tokens, strict=True)]
    rows: dict[str, dict[str, Any]] = {}
    for name in args.proxies:
        backends = _proxies.start_backends(BACKENDS)  # fresh backends: no queue left over from the last run
        proxy = _proxies.make(name, backends)
        try:
            proxy.start()
            result = _proxies.run_loadgen({"mode": "replay", "target": proxy.targets[0], "arrivals": plan})
            rows[name] = summarize(result)
        except Exception as exc:  # a balancer that breaks is a figure too, not the end of the run
            rows[name] = {"error": f"failed: {exc}"[:200]}
            print(proxy.log_tail(), file=sys.stderr)
        finally:
            proxy.stop()
            for backend in backends:
                _proxies.stop(backend.proc)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    table = report(rows, args, info, notes)
    print(table)
    if not args.no_record:
        _record.record(
            "balance_quality", "Balancing quality: TTFT on heterogeneous backends, Azure trace", table
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
