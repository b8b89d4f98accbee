"""`forestall demo` end to end: real balancer, real worker processes, real streams; nothing left running."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rich.console import Console

from emulation import demo


def _children() -> set[int]:
    """PIDs of live processes whose parent is this test process."""
    mine = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == mine and fields[0] != "Z":
            found.add(int(entry.name))
    return found


async def test_demo_serves_the_trace_without_cutting_streams_and_cleans_up() -> None:
    before = _children()
    opts = demo.DemoOptions(duration_s=25.0, live_view=False, prometheus=False, seed=1)
    results = (await demo.run(opts, console=Console(quiet=True))).policies
    live = results["forestall (live)"]
    assert live.arrived > 100
    assert live.completed > 0.8 * live.arrived
    assert live.cut == 0
    assert live.gpu_hours > 0
    assert {"oracle", "oracle-lead", "forestall (simulated)"} <= set(results)
    assert results["oracle"].gpu_hours <= live.gpu_hours
    assert _children() == before


async def test_cancelling_the_demo_stops_every_process_it_started() -> None:
    """Ctrl-C arrives as cancellation of the running demo: the balancer and the workers must go too."""
    before = _children()
    opts = demo.DemoOptions(duration_s=120.0, live_view=False, prometheus=False)
    task = asyncio.create_task(demo.run(opts, console=Console(quiet=True)))
    for _ in range(400):  # until the balancer and the first workers run
        await asyncio.sleep(0.05)
        if len(_children() - before) >= 2:
            break
    assert len(_children() - before) >= 2
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert _children() == before
