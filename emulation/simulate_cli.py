"""`forestall simulate`: replay a demand trace through Forestall, reactive autoscaling and the oracles.

Runs with no cluster and no network. Without `--trace` it replays the small real trace bundled in the package
(two weekdays of the Azure 2024 LLM conversation service, see `emulation/data/README.md`). It prints one
table row per policy (or `--json`), and `--plot` draws demand, Forestall's forecast, each policy's Ready
capacity and its SLO misses over time. `--sweep FIELD=V1,V2,...` varies one policy field instead (one row per
value, `emulation.frontier`), and `--plot` then draws SLO attainment against GPU-hours for each value beside
the baselines and the oracles: the frontier an operator picks a point on.

The engine is `emulation.simulate`; this module only parses options, shows progress and renders results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller import policy
    from emulation import frontier, results

BASELINES = ("reactive", "reactive-ca")
"""Policies `--compare` may name; Forestall and the two oracles always run."""

PROGRESS_MIN_S = 6 * 3600.0
"""Traces longer than this get a progress bar (on a terminal): shorter ones finish in seconds."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay a demand trace through Forestall, reactive autoscaling and the oracles (no cluster)",
        description=(
            "Replay a real demand trace through Forestall's decision and balancing code on a simulated GPU "
            "cluster, next to HPA-style reactive autoscaling and the oracles, and report SLO attainment, "
            "waits, rejected and cut streams and GPU-hours for each."
        ),
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="CSV trace: per request (timestamp + output tokens) or a count series (timestamp + arrivals per "
        "step); columns found from the header. Default: the bundled two-day Azure 2024 LLM trace",
    )
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="ScalingPolicy YAML (a whole object or just its spec) for the forestall policy; default: 16 "
        "streams per 1-GPU replica, 8-GPU nodes, 6+1+2 min lead time, 2 s start SLO",
    )
    p.add_argument(
        "--compare",
        default=",".join(BASELINES),
        help="comma-separated baselines to run besides forestall and the two oracles: reactive, reactive-ca, "
        "or none (default: %(default)s)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--peak-streams",
        type=float,
        default=None,
        metavar="N",
        help="rescale arrivals so the trace's busiest minute needs about N concurrent streams",
    )
    size.add_argument(
        "--scale", type=float, default=None, metavar="X", help="multiply the arrival rate by X (default 1)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for arrivals, stream lengths and delays (default 0)"
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="FIELD=V1,V2,...",
        help="run once per value of one policy field (dotted path, e.g. forecast.quantile=0.8,0.9,0.95,0.99 "
        "or scaleDown.stabilizationWindowSeconds=300,600) on the same streams, one row per value",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="write a PNG here: the run over time, or with --sweep SLO attainment vs GPU-hours per value",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controller import errors
    from emulation import frontier as frontier_mod
    from emulation import simulate, traces

    try:
        trace = traces.read_trace(args.trace if args.trace is not None else traces.bundled_trace_path())
        spec = load_spec(args.policy) if args.policy is not None else simulate.default_spec()
        compare = [c.strip() for c in args.compare.split(",") if c.strip() and c.strip() != "none"]
        bad = [c for c in compare if c not in BASELINES]
        if bad:
            raise ValueError(
                f"--compare: unknown baseline {', '.join(bad)}; choose from {', '.join(BASELINES)}"
            )
        if args.peak_streams is not None:
            if not args.peak_streams > 0:
                raise ValueError(f"--peak-streams must be > 0, got {args.peak_streams:g}")
            scale = simulate.scale_for_peak(
                trace, args.peak_streams, seconds_per_token=spec.capacity.seconds_per_token
            )
        else:
            scale = args.scale if args.scale is not None else 1.0
            if not scale > 0:
                raise ValueError(f"--scale must be > 0, got {scale:g}")
        sweep = frontier_mod.parse_sweep(args.sweep) if args.sweep is not None else None
        if sweep is not None:
            for value in sweep.values:  # every value is checked before hours of simulation start
                frontier_mod.with_field(spec, sweep.field, value)
    except (ValueError, errors.InvalidPolicy) as exc:
        print(f"forestall simulate: {exc}", file=sys.stderr)
        return 1

    if sweep is not None:
        return _run_sweep(args, trace, spec, sweep, compare=compare, scale=scale)
    result = _run_with_progress(trace, spec, compare=compare, scale=scale, seed=args.seed, quiet=args.json)
    if args.plot is not None:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_table(result)
        if args.plot is not None:
            print(f"plot written to {args.plot}")
    return 0


def _run_sweep(
    args: argparse.Namespace,
    trace: Any,
    spec: policy.ScalingPolicySpec,
    sweep: frontier.Sweep,
    *,
    compare: list[str],
    scale: float,
) -> int:
    from rich.console import Console
    from rich.table import Table

    from emulation import frontier

    err = Console(stderr=True)

    def progress(i: int, n: int) -> None:
        if not args.json and err.is_terminal:
            err.print(f"simulating {sweep.field}={sweep.labels[i]} ({i + 1}/{n})", style="dim")

    result = frontier.run(trace, spec, sweep, compare=compare, scale=scale, seed=args.seed, on_value=progress)
    table_rows = frontier.rows(result)
    if args.plot is not None:
        frontier.plot_frontier(result, args.plot)
    if args.json:
        print(json.dumps({"sweep": sweep.field, "rows": table_rows}, indent=2))
        return 0
    first = result.runs[0]
    table = Table(
        title=(
            f"{Path(first.trace).name}: {(first.end_s - first.start_s) / 3600:.1f} h (scale {first.scale:.3g}),"
            f" sweeping {sweep.field}"
        ),
        title_justify="left",
    )
    for col in (
        "policy",
        sweep.field,
        "SLO met",
        "wait p99",
        "rejected",
        "cut",
        "GPU-h",
        "vs lead",
        "events",
    ):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for r in table_rows:
        table.add_row(
            r["policy"],
            "" if r[sweep.field] is None else str(r[sweep.field]),
            f"{100 * r['slo_attainment']:.3f}%",
            f"{r['wait_p99_s']:.2f} s",
            f"{r['streams_rejected']:,}",
            f"{r['streams_cut']:,}",
            f"{r['gpu_hours']:,.1f}",
            f"{r['gpu_hours_vs_oracle_lead']:.3f}x",
            f"{r['scale_events']:,}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    if args.plot is not None:
        console.print(f"frontier plot written to {args.plot}")
    return 0


def load_spec(path: Path) -> policy.ScalingPolicySpec:
    """A ScalingPolicy spec from YAML: a whole ScalingPolicy object, or only its spec."""
    import yaml

    from controller import errors, policy

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the policy: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a ScalingPolicy mapping, got {type(doc).__name__}")
    if "spec" in doc:
        return policy.parse(doc).spec
    try:
        return policy.ScalingPolicySpec.model_validate(doc)
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise errors.InvalidPolicy(policy.format_errors(exc)) from exc
        raise


def _run_with_progress(
    trace: Any, spec: policy.ScalingPolicySpec, *, compare: list[str], scale: float, seed: int, quiet: bool
) -> results.SimResult:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from contract import clock
    from emulation import simulate

    console = Console(stderr=True)
    show = not quiet and console.is_terminal and trace.duration_s > PROGRESS_MIN_S
    started = clock.SYSTEM.monotonic()
    with Progress(
        TextColumn("simulating"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not show,
    ) as progress:
        task = progress.add_task("simulate", total=1.0)
        result = simulate.simulate(
            trace,
            spec,
            policies=["forestall", *compare],
            scale=scale,
            seed=seed,
            on_progress=lambda f: progress.update(task, completed=f),
        )
    result.wall_s = clock.SYSTEM.monotonic() - started
    return result


def print_table(result: results.SimResult) -> None:
    from rich.console import Console
    from rich.table import Table

    data = result.to_json()
    pols: dict[str, dict[str, Any]] = data["policies"]  # type: ignore[assignment]
    spec = result.spec
    arrived = next(iter(pols.values()))["streams_arrived"]
    table = Table(
        title=(
            f"{Path(result.trace).name}: {(result.end_s - result.start_s) / 3600:.1f} h, {arrived:,} streams"
            f" (scale {result.scale:.3g}), {spec.capacity.streams_per_replica} streams/replica, lead time "
            f"{spec.lead_time.total_s / 60:.0f} min, SLO: start within {spec.slo.time_to_first_token_s:g} s"
        ),
        title_justify="left",
    )
    for col in (
        "policy",
        "SLO met",
        "wait p50",
        "wait p99",
        "rejected",
        "cut",
        "GPU-h",
        "vs oracle",
        "vs lead",
        "scale events",
    ):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for name, r in pols.items():
        table.add_row(
            name,
            f"{100 * r['slo_attainment']:.3f}%",
            f"{r['wait_p50_s']:.2f} s",
            f"{r['wait_p99_s']:.2f} s",
            f"{r['streams_rejected']:,}",
            f"{r['streams_cut']:,}",
            f"{r['gpu_hours']:,.1f}",
            f"{r['gpu_hours_vs_oracle']:.3f}x",
            f"{r['gpu_hours_vs_oracle_lead']:.3f}x",
            f"{r['scale_events']:,}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped or captured: do not squeeze the table to 80 columns
    console.print(table)
    console.print(
        f"oracle: capacity equal to each second's peak demand, Ready at once; oracle-lead: whole nodes requested "
        f"one lead time ahead. Simulated in {result.wall_s:.1f} s.",
        style="dim",
    )


COLORS = {
    "forestall": "tab:green",
    "reactive": "tab:orange",
    "reactive-ca": "tab:red",
    "oracle": "black",
    "oracle-lead": "tab:blue",
}


def plot(result: results.SimResult, out: Path) -> None:
    """Demand, Forestall's forecast, Ready capacity per policy and SLO misses over time, as a PNG."""
    import datetime as dt

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import numpy as np

    def when(ts: Any) -> Any:
        return [dt.datetime.fromtimestamp(float(t), tz=dt.UTC) for t in ts]

    per = 60
    demand = result.demand_per_s
    n_min = demand.size // per
    d_min = demand[: n_min * per].reshape(n_min, per).max(axis=1)
    t_min = result.start_s + np.arange(n_min) * per
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(13, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    ax.fill_between(when(t_min), 0, d_min, color="0.8", step="post", label="demand (peak streams per minute)")
    fc = result.forecast
    ok = ~np.isnan(fc)
    if ok.any():
        q = result.spec.forecast.quantile
        ax.plot(
            when(result.tick_t[ok]),
            fc[ok],
            color="tab:green",
            lw=0.8,
            ls=":",
            alpha=0.9,
            label=f"forestall forecast: q{q:g} of the peak over the lead time",
        )
    for name, series in result.ready_streams.items():
        if name == "oracle":
            continue
        if name == "oracle-lead":
            m = series[: n_min * per].reshape(n_min, per).max(axis=1)
            ax.plot(
                when(t_min),
                m,
                color=COLORS[name],
                lw=1.0,
                alpha=0.6,
                drawstyle="steps-post",
                label="oracle-lead: billed capacity (streams)",
            )
            continue
        ax.plot(
            when(result.tick_t),
            series,
            color=COLORS.get(name, "gray"),
            lw=1.1,
            drawstyle="steps-post",
            label=f"{name}: Ready capacity (streams)",
            zorder=3 if name == "forestall" else 2,
        )
    ax.set_ylabel("concurrent streams")
    # A reactive burst can ask for many times the demand; keep the demand readable and say what is cut off.
    top = 1.6 * float(d_min.max()) if d_min.size else 1.0
    clipped = [n for n, v in result.ready_streams.items() if n in result.misses and v.size and v.max() > top]
    ax.set_ylim(0, top)
    if clipped:
        ax.text(
            0.99,
            0.98,
            f"clipped at {top:,.0f}: {', '.join(clipped)}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="0.35",
        )
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    pols = result.policies
    ax.set_title(
        "  ".join(
            f"{name}: SLO {100 * pols[name].slo_attainment:.2f}%, {pols[name].gpu_hours:,.0f} GPU-h"
            for name in pols
            if name in result.misses or name == "oracle-lead"
        ),
        fontsize=9,
    )
    bucket = 40  # ticks of 15 s: 10 minutes
    for name, miss in sorted(result.misses.items(), key=lambda kv: kv[0] == "forestall"):
        nb = int(np.ceil(miss.size / bucket))
        padded = np.zeros(nb * bucket, dtype=np.int64)
        padded[: miss.size] = miss
        per_bucket = padded.reshape(nb, bucket).sum(axis=1)
        ax2.plot(
            when(result.tick_t[::bucket][:nb]),
            per_bucket,
            color=COLORS.get(name, "gray"),
            drawstyle="steps-post",
            lw=1.0,
            label=name,
        )
    ax2.set_ylabel("SLO misses / 10 min")
    ax2.set_yscale("symlog", linthresh=1)
    most = max((int(m.max()) for m in result.misses.values() if m.size), default=0)
    ax2.set_ylim(0, max(10.0, most * 40.0))  # bucket sums reach up to 40 ticks' worth
    ax2.legend(loc="upper left", fontsize=8, ncol=3)
    ax2.xaxis.set_major_formatter(mdates.DateFormatter("%a %H:%M", tz=dt.UTC))  # type: ignore[no-untyped-call]
    ax2.set_xlabel("time (UTC)")
    fig.suptitle(f"forestall simulate: {Path(result.trace).name}", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
