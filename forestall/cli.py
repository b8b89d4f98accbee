"""The `forestall` console script: one entry point, a subcommand per component.

Each subcommand lives in its component's own module, which exposes `add_parser(subparsers)`; that function
declares the options (each with help text) and sets `func` to a `run(args) -> int`. Command modules import
heavy dependencies (scikit-learn, aiohttp, kubernetes) inside `run`, so `forestall --help` stays fast.

Exit codes: 0 success, 1 the command ran and found a problem (an invalid policy, a failed check), 2 a usage
error (argparse's convention: unknown option, missing argument).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = ("controller.policy_cli",)
"""Modules that add subcommands, in the order `forestall --help` lists them."""

OPTIONAL_COMMAND_MODULES = (
    "controller.controller_cli",
    "emulation.simulate_cli",
    "emulation.demo_cli",
    "balancer.cli",
    "balancer.picker_cli",
    "forecast.cli",
)
"""Subcommands of components that register themselves when their module exists."""


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI: `forestall SUBCOMMAND [options]`."""
    parser = argparse.ArgumentParser(
        prog="forestall",
        description="Keep GPU inference capacity ahead of stream demand: forecast, provision, balance, drain.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    for name in OPTIONAL_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
