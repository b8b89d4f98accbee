"""`forestall simulate` on real week-scale demand: Forestall against HPA, HPA + cluster-autoscaler and the oracles.

Traces (read from ../shared/data, never copied): the 7-day Azure 2024 LLM conversation series (requests per
10 s) and the NASA HTTP 1995 series (requests per minute, two months with a 3.4-day logging gap and the
Hurricane Erin outage; by default its first week, `--nasa-days 62` for all of it). Both are scaled so that their busiest minute needs `--peak-streams` concurrent streams
(default 512: 32 replicas of 16 streams), stream lengths drawn from the bundled Azure 2023 token distribution
at 30 ms per token. Policy: the simulator's default (16 streams per 1-GPU replica, 8-GPU nodes, lead time
6 min node + 1 min pod + 2 min model load, start-within-2-s SLO). Every figure of a trace comes from the same
run: one `simulate()` call, all policies on the same streams.

Targets (issue 6): Forestall SLO attainment >= 99.5% and >= reactive-ca's, GPU-hours <= 1.10x oracle-lead,
zero streams cut; a 7-day trace at 10-s steps in <= 60 s on one core (the process's CPU time is reported next
to the wall time, since other work may share the machine).

    .venv/bin/python -m bench.simulate                    # both traces, records the BENCHMARKS.md section
    .venv/bin/python -m bench.simulate --trace azure --no-record
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import _record
from emulation import results, simulate, traces

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TRACES = {
    "azure": ("Azure LLM 2024 conversation, 7 days, 10 s", DATA / "azure_llm_2024_conv_invocations_10s.csv"),
    "nasa": ("NASA HTTP 1995, 1 min (from 1995-07-01)", DATA / "nasa_http_1995_requests_1min.csv"),
}


def run_one(
    key: str, *, peak_streams: float, seed: int, days: float | None, start_day: float = 0.0
) -> tuple[results.SimResult, float, float]:
    path = TRACES[key][1]
    trace = traces.read_trace(path)
    if (days is not None or start_day) and trace.counts is not None:
        i0 = int(start_day * 86400 / trace.step_s)
        n = (
            trace.counts.size - i0
            if days is None
            else min(trace.counts.size - i0, int(days * 86400 / trace.step_s))
        )
        trace = traces.Trace(
            kind="counts",
            start_s=trace.start_s + i0 * trace.step_s,
            end_s=trace.start_s + (i0 + n) * trace.step_s,
            source=trace.source,
            columns=trace.columns,
            step_s=trace.step_s,
            counts=trace.counts[i0 : i0 + n],
        )
    spec = simulate.default_spec()
    scale = simulate.scale_for_peak(trace, peak_streams, seconds_per_token=spec.capacity.seconds_per_token)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = simulate.simulate(
        trace, spec, policies=("forestall", "reactive", "reactive-ca"), scale=scale, seed=seed
    )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    result.wall_s = wall
    return result, wall, cpu


def table(key: str, result: results.SimResult, wall: float, cpu: float) -> str:
    title = TRACES[key][0]
    data = result.to_json()
    pols = data["policies"]
    assert isinstance(pols, dict)
    first = next(iter(pols.values()))
    lines = [
        f"### {title}",
        "",
        f"{(result.end_s - result.start_s) / 86400:.1f} days simulated, {first['streams_arrived']:,} streams "
        f"(arrival scale {result.scale:.3g}), seed {result.seed}; wall {wall:.1f} s, CPU {cpu:.1f} s.",
        "",
        "| policy | SLO attainment | wait p50 | wait p99 | rejected | cut | GPU-hours | vs oracle | vs oracle-lead "
        "| scale events |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in pols.items():
        lines.append(
            f"| {name} | {100 * r['slo_attainment']:.3f}% | {r['wait_p50_s']:.2f} s | {r['wait_p99_s']:.2f} s | "
            f"{r['streams_rejected']:,} | {r['streams_cut']:,} | {r['gpu_hours']:,.1f} | "
            f"{r['gpu_hours_vs_oracle']:.3f}x | {r['gpu_hours_vs_oracle_lead']:.3f}x | {r['scale_events']:,} |"
        )
    f, ca = pols["forestall"], pols.get("reactive-ca")
    checks = [
        ("SLO attainment >= 99.5%", f["slo_attainment"] >= 0.995, f"{100 * f['slo_attainment']:.3f}%"),
        (
            "SLO attainment >= reactive-ca's",
            ca is None or f["slo_attainment"] >= ca["slo_attainment"],
            f"{100 * f['slo_attainment']:.3f}% vs {100 * ca['slo_attainment']:.3f}%" if ca else "n/a",
        ),
        (
            "GPU-hours <= 1.10x oracle-lead",
            f["gpu_hours_vs_oracle_lead"] <= 1.10,
            f"{f['gpu_hours_vs_oracle_lead']:.3f}x",
        ),
        ("zero streams cut", f["streams_cut"] == 0, f"{f['streams_cut']:,}"),
    ]
    if key == "azure":
        checks.append(("7 days at 10 s in <= 60 s (CPU)", cpu <= 60.0, f"{cpu:.1f} s CPU, {wall:.1f} s wall"))
    lines += ["", "| Forestall target | met | measured |", "| --- | --- | ---: |"]
    lines += [f"| {what} | {'yes' if ok else '**no**'} | {value} |" for what, ok, value in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", choices=[*TRACES, "all"], default="all", help="which trace (default all)")
    ap.add_argument("--peak-streams", type=float, default=512.0, help="busiest minute's concurrent streams")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    ap.add_argument("--days", type=float, default=None, help="simulate only DAYS of each trace")
    ap.add_argument(
        "--nasa-days",
        type=float,
        default=7.0,
        help="days of the NASA trace to simulate unless --days is given (default 7: its first week; the whole "
        "62 days take about nine times the Azure week's CPU)",
    )
    ap.add_argument("--start-day", type=float, default=0.0, help="start this many days into each trace")
    ap.add_argument("--no-record", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = ap.parse_args(argv)
    keys = list(TRACES) if args.trace == "all" else [args.trace]
    missing = [str(TRACES[k][1]) for k in keys if not TRACES[k][1].is_file()]
    if missing:
        print(f"bench.simulate: trace files not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    parts = []
    for key in keys:
        days = args.days if args.days is not None or key != "nasa" else args.nasa_days
        result, wall, cpu = run_one(
            key, peak_streams=args.peak_streams, seed=args.seed, days=days, start_day=args.start_day
        )
        text = table(key, result, wall, cpu)
        print(text + "\n", flush=True)
        parts.append(text)
    if not args.no_record and args.trace == "all":
        body = (
            "Every policy of a trace in one run on the same streams: `forestall` (decide() every 15 s, default "
            "policy), `reactive` (HPA defaults, nodes at once), `reactive-ca` (HPA + cluster-autoscaler: nodes "
            "only for pending pods, 10 min unneeded time), `oracle` (each second's peak, Ready at once), "
            "`oracle-lead` (whole nodes requested one lead time ahead). Lead time 6 min node + 1 min pod + "
            f"2 min model load, 16 streams per 1-GPU replica, 8-GPU nodes, SLO: start within 2 s; both traces "
            f"scaled to a busiest minute of {args.peak_streams:g} streams.\n\n" + "\n\n".join(parts)
        )
        command = " ".join(
            [".venv/bin/python -m bench.simulate", *(argv if argv is not None else sys.argv[1:])]
        )
        _record.record(
            "simulate",
            "forestall simulate: Forestall vs reactive autoscaling vs the oracles",
            body,
            command=command,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
