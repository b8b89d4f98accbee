"""The injected clock: FakeClock moves only when told, and no module reads the wall clock behind its back."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from contract import clock

ROOT = Path(__file__).resolve().parents[2]
BANNED = {
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
}
"""Calls that read the machine's clock; only contract/clock.py may make them."""


def test_no_wall_clock_reads_outside_clock_module() -> None:
    offenders = []
    for package in ("controller", "balancer", "forecast"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "clock.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = node.func.value
                    name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                    if (name, node.func.attr) in BANNED:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}.{node.func.attr}()")
    assert offenders == [], "read time through contract.clock instead"


async def test_fake_clock_wakes_sleepers_only_when_advanced() -> None:
    fake = clock.FakeClock(start=100.0)
    woke: list[float] = []

    async def sleeper(s: float) -> None:
        await fake.sleep(s)
        woke.append(fake.monotonic())

    tasks = [asyncio.create_task(sleeper(5)), asyncio.create_task(sleeper(10))]
    await asyncio.sleep(0)
    fake.advance(4)
    await asyncio.sleep(0)
    assert woke == []
    fake.advance(1)
    await asyncio.sleep(0)
    assert woke == [5.0]
    fake.advance(5)
    await asyncio.gather(*tasks)
    assert woke == [5.0, 10.0]
    assert fake.now() == 110.0


def test_fake_clock_refuses_to_go_back() -> None:
    with pytest.raises(ValueError, match="cannot go back"):
        clock.FakeClock().advance(-1)


def test_utc_iso_is_kubernetes_format() -> None:
    assert clock.utc_iso(0) == "1970-01-01T00:00:00Z"
