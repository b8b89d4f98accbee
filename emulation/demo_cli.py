"""`forestall demo`: the live embedded default (see `emulation.demo` for what runs and why)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """Register `demo`."""
    p = sub.add_parser(
        "demo",
        help="run balancer, emulated GPU workers, controller and a real trace live on this machine",
        description="Start the real balancer, emulated GPU inference servers as local processes, the controller "
        "in local mode and a load generator replaying a real trace; show a live view; end with the same table "
        "as `forestall simulate`. Bounded in time; Ctrl-C stops everything it started.",
    )
    p.add_argument(
        "--duration", type=float, default=180.0, metavar="S", help="wall seconds to run (default 180)"
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=8.0,
        metavar="X",
        help="trace seconds per wall second (default 8: a 6-minute node arrives in 45 s)",
    )
    p.add_argument(
        "--peak-streams",
        type=float,
        default=24.0,
        metavar="N",
        help="rescale arrivals so the trace's peak needs about N concurrent streams (default 24)",
    )
    p.add_argument(
        "--slots", type=int, default=6, metavar="N", help="streams each emulated replica serves (default 6)"
    )
    p.add_argument(
        "--tokens-per-chunk",
        type=int,
        default=8,
        metavar="N",
        help="tokens each relayed chunk stands for, to keep the relay cheap on a small machine (default 8)",
    )
    p.add_argument(
        "--trace", type=Path, default=None, metavar="FILE", help="trace to replay (default: bundled)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for arrivals and start-up jitter (default 0)")
    p.add_argument(
        "--prometheus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start Prometheus and print the dashboard queries' values (default: when on PATH)",
    )
    p.add_argument("--no-live", action="store_true", help="no live view (for logs and CI)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from emulation import demo, simulate_cli

    for name in ("duration", "time_scale", "peak_streams"):
        if not getattr(args, name) > 0:
            raise SystemExit(
                f"forestall demo: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
            )
    opts = demo.DemoOptions(
        duration_s=args.duration,
        time_scale=args.time_scale,
        peak_streams=args.peak_streams,
        slots=args.slots,
        tokens_per_chunk=args.tokens_per_chunk,
        seed=args.seed,
        trace=args.trace,
        prometheus=args.prometheus,
        live_view=not args.no_live,
    )
    console = Console()
    try:
        results = asyncio.run(demo.run(opts, console=console))
    except KeyboardInterrupt:
        console.print("stopped: every process the demo started has been terminated")
        return 130
    simulate_cli.print_table(results)
    return 0
