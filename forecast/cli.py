"""`forestall forecast backtest`: rolling-origin evaluation of peak forecasts on a CSV series.

Reads a series (`forecast.series.read_csv`: columns found by content; event logs counted per step; one row
of a wide M4 file with `--m4-id`), optionally aggregates it to a coarser step, runs `forecast.backtest`
for the chosen model and the baselines on the same origins, and prints a table (rich), one JSON object
(`--json`), and optionally a plot of history, forecast peak band and actual peaks (`--plot`, matplotlib
Agg). Bad input (unreadable columns, too little data) prints the reason and exits 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from forecast import backtest as bt


def _duration(text: str) -> float:
    try:
        return bt.parse_duration_s(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _quantile(text: str) -> float:
    try:
        q = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0.0 < q < 1.0:
        raise argparse.ArgumentTypeError(f"quantile must lie strictly between 0 and 1, got {text}")
    return q


def add_parser(sub: Any) -> None:
    """Register `forecast backtest`."""
    p = sub.add_parser(
        "forecast",
        help="forecast tools: backtest peak forecasts on a CSV series",
        description="Forecast tools. `forestall forecast backtest --series FILE.csv --horizon 10m` evaluates "
        "the peak-demand forecaster against the baselines on a real series.",
    )
    fsub = p.add_subparsers(
        dest="forecast_command", metavar="SUBCOMMAND", required=True, help="backtest: evaluate peak forecasts"
    )
    b = fsub.add_parser(
        "backtest",
        help="rolling-origin backtest of the q-quantile of the peak over a horizon",
        description="Rolling-origin backtest over the second half of the series: pinball loss of the peak, "
        "coverage, under-forecast rate, mean shortfall, mean excess and path MAE, for the model and the "
        "baselines (seasonal naive by day and week, recent max) on the same origins.",
    )
    b.add_argument("--series", type=Path, required=True, metavar="FILE.csv", help="CSV with a header")
    b.add_argument("--horizon", type=_duration, required=True, metavar="DURATION", help="e.g. 10m, 30m, 2h")
    b.add_argument("--quantile", type=_quantile, default=0.95, help="quantile of the peak (default 0.95)")
    b.add_argument(
        "--step",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="time between forecast origins (default: one series step)",
    )
    b.add_argument("--model", default="auto", help="auto (default) or one model, e.g. profile_day, gbm")
    b.add_argument(
        "--resample",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="aggregate to this coarser step first",
    )
    b.add_argument(
        "--aggregate",
        choices=("sum", "max"),
        default="sum",
        help="how --resample aggregates: sum for counts per step (default), max for concurrency",
    )
    b.add_argument("--time-column", default=None, help="override the detected timestamp column")
    b.add_argument("--value-column", default=None, help="override the detected value column")
    b.add_argument(
        "--m4-id", default=None, metavar="ID", help="series id in a wide M4 file (e.g. H1); hourly"
    )
    b.add_argument(
        "--max-origins",
        type=int,
        default=None,
        metavar="N",
        help="thin the origins evenly to at most N (faster on long series)",
    )
    b.add_argument(
        "--max-refits",
        type=int,
        default=bt.MAX_REFITS,
        metavar="N",
        help=f"refit the model at most N times over the backtest (default {bt.MAX_REFITS})",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b.add_argument(
        "--plot", type=Path, default=None, metavar="OUT.png", help="draw history, band and actuals"
    )
    b.set_defaults(func=run_backtest)


def run_backtest(args: argparse.Namespace) -> int:
    import numpy as np

    from forecast import series

    try:
        if args.m4_id is not None:
            rows = series.read_m4(args.series)
            if args.m4_id not in rows:
                some = ", ".join(list(rows)[:5])
                raise ValueError(f"{args.series}: no series {args.m4_id!r} (ids look like {some}, ...)")
            s = series.m4_series(rows[args.m4_id])
        else:
            s = series.read_csv(args.series, time_column=args.time_column, value_column=args.value_column)
        ts, vs = s.timestamps, s.values
        step_s = s.step_s
        if args.resample is not None:
            if args.resample < step_s:
                raise ValueError(f"--resample {args.resample:g} s is finer than the series step {step_s:g} s")
            ts, vs = series.resample(ts, vs, args.resample, how=args.aggregate)
            step_s = args.resample
        horizon_steps = max(1, math.ceil(args.horizon / step_s - 1e-9))
        stride = 1 if args.step is None else max(1, round(args.step / step_s))
        report = bt.backtest(
            ts,
            vs,
            step_s=step_s,
            horizon_steps=horizon_steps,
            quantile=args.quantile,
            model=args.model,
            origin_stride_steps=stride,
            max_origins=args.max_origins,
            max_refits=args.max_refits,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = {
        "series": str(args.series),
        "m4_id": args.m4_id,
        "time_column": s.time_column,
        "value_column": s.value_column,
        "points": int(np.asarray(vs).size),
        "step_s": step_s,
        "horizon_s": args.horizon,
        "origin_stride_steps": stride,
    }
    if args.json:
        print(json.dumps({**info, **report.to_dict()}, allow_nan=False, default=float))
    else:
        _print_table(info, report)
    if args.plot is not None:
        _plot(args.plot, ts, vs, report)
    return 0


def _print_table(info: dict[str, Any], report: bt.BacktestReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    console.print(
        f"[bold]{info['series']}[/bold]{' ' + info['m4_id'] if info['m4_id'] else ''}: "
        f"{info['value_column']!r} by {info['time_column']!r}, {info['points']} points, step {info['step_s']:g} s; "
        f"horizon {report.horizon_steps} steps ({report.horizon_steps * report.step_s:g} s), "
        f"q={report.quantile}, {report.model.origins} origins"
    )
    ref = next((b.pinball_peak for b in report.baselines if b.model == "snaive_day"), None)
    table = Table(title=f"Peak forecast backtest (q={report.quantile})")
    for col in (
        "model",
        "pinball(peak)",
        "vs snaive_day",
        "coverage",
        "under rate",
        "shortfall",
        "excess",
        "path MAE",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in [report.model, *report.baselines]:
        rel = f"{m.pinball_peak / ref:.2f}x" if ref else "-"
        table.add_row(
            m.model,
            f"{m.pinball_peak:.3f}",
            rel,
            f"{m.coverage:.1%}",
            f"{m.under_rate:.1%}",
            f"{m.mean_shortfall:.2f}",
            f"{m.mean_excess:.2f}",
            f"{m.path_mae:.2f}",
        )
    console.print(table)
    chosen = ", ".join(f"{k} x{v}" for k, v in sorted(report.chosen.items(), key=lambda kv: -kv[1]))
    console.print(f"models chosen per refit block: {chosen}")


def _plot(path: Path, ts: Any, vs: Any, report: bt.BacktestReport) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # The last two days of origins, or all if fewer: long enough to see the cycle, short enough to read.
    origins = report.origin_s
    lo = origins[-1] - 2 * 86400.0
    sel = origins >= lo
    hist = (ts >= lo - 86400.0) & (ts <= origins[-1] + report.horizon_steps * report.step_s)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.plot((ts[hist] - origins[-1]) / 3600, vs[hist], color="0.6", lw=0.8, label="demand")
    x = (origins[sel] - origins[-1]) / 3600
    ax.fill_between(
        x,
        0,
        report.predicted_peak[sel],
        step="post",
        color="tab:blue",
        alpha=0.2,
        label=f"q={report.quantile} peak forecast",
    )
    ax.plot(x, report.actual_peak[sel], color="tab:red", lw=0.8, label="actual peak over horizon")
    ax.set_xlabel("hours relative to the last origin")
    ax.set_ylabel("demand")
    ax.set_ylim(bottom=0, top=float(np.nanmax(report.actual_peak[sel])) * 1.3 if sel.any() else None)
    ax.legend(loc="upper left")
    ax.set_title(
        f"{report.model.model}: horizon {report.horizon_steps} steps, coverage {report.model.coverage:.1%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
