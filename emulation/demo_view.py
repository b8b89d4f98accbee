"""`forestall demo`'s live view: the demand, the forecast, the plan, the replicas and every backend's streams.

What this module does not do: compute anything it shows (the demo's controller and load generator fill
`DemoState` and the stream counts).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from contract import clock as clock_mod
from controller import policy
from emulation import demo_controller, local


class StreamCounts(Protocol):
    """What the load generator counted so far (virtual seconds)."""

    started: int
    ok: int
    rejected: int
    cut: int
    error: int
    waits_s: list[float]


async def show(
    view: demo_controller.DemoState,
    stats: StreamCounts,
    cl: local.LocalCluster,
    console: Console,
    *,
    vc: demo_controller.VirtualClock,
    end_s: float,
    spec: policy.ScalingPolicySpec,
) -> None:
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while vc.now() < end_s:
            live.update(_render(view, stats, cl, spec))
            await vc.wall.sleep(0.25)
        live.update(_render(view, stats, cl, spec))


def _render(
    view: demo_controller.DemoState,
    stats: StreamCounts,
    cl: local.LocalCluster,
    spec: policy.ScalingPolicySpec,
) -> Group:
    plan = view.plan
    state = cl.state()
    starting = sum(1 for p in state.pods if p.phase in ("pending", "starting"))
    head = Table.grid(padding=(0, 3))
    fc = plan.forecast if plan else None
    head.add_row(
        f"[bold]{_clock(view.vnow)}[/]",
        f"demand [bold]{view.demand:.0f}[/] streams",
        f"forecast q{fc.quantile:g} peak [bold]{fc.value:.1f}[/] over {fc.horizon_s:.0f}s"
        if fc
        else "forecast -",
        f"replicas desired [bold]{plan.desired_replicas if plan else '-'}[/] ready {state.ready_replicas} "
        f"starting {starting}",
        f"nodes {len(state.nodes)} (pending GPUs {state.pending_gpus})",
        f"queue {view.admission_queue}",
    )
    head.add_row(
        f"streams: {stats.started} arrived",
        f"{stats.ok} done",
        f"{stats.rejected} rejected / {stats.cut} cut / {stats.error} failed",
        f"wait p99 {np.percentile(stats.waits_s, 99):.1f}s" if stats.waits_s else "wait -",
        f"GPU-h {cl.gpu_seconds / 3600:.2f}",
        "",
    )
    backends = Table(title="streams per backend", expand=False, show_edge=False)
    for column in ("pod", "state", "streams", "load", "hotspot"):
        backends.add_column(column)
    slots = spec.capacity.streams_per_replica
    for b in sorted(view.backends.values(), key=lambda b: b.pod or b.address):
        bar = "█" * min(b.active_streams, 2 * slots)
        hot = f"{b.hotspot_score:.1f}" + (" HOT" if b.hotspot else "")
        backends.add_row(b.pod or b.address, b.state, str(b.active_streams), bar, hot)
    reasons = "; ".join(f"{r.code}: {r.message}" for r in (plan.reasons[-2:] if plan else ()))
    events = "\n".join(view.events)
    return Group(head, backends, f"[dim]{reasons}[/]", events)


def _clock(v: float) -> str:
    return clock_mod.utc_iso(v)[11:19]
