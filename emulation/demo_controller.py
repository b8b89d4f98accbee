"""`forestall demo`'s controller: the product's reconcile pipeline on a virtual clock, with local seams.

Every `RECONCILE_S` virtual seconds the demo runs `controller.pipeline.PolicyPipeline.reconcile()`, the same
reconcile the Kubernetes loop and `forestall simulate` run. Its seams here:

- the cluster: `emulation.local.LocalCluster` (worker processes, emulated node and start-up delays);
- the demand source (`BalancerDemand`): the balancer's real `/signals` over HTTP, and a history that starts
  as the trace's demand before the demo window (what Prometheus would hold) and is extended with the
  largest demand the signals showed in each forecast step;
- the reporter (`ViewReporter`): the controller's metrics, the live view's events, and a timeline of every
  reconcile (how late it ran, demand, queue, replicas) for the demo's closing note;
- the clock: `VirtualClock`, trace time running `time_scale` times faster than the wall clock.

Seams run inline: the local cluster only records intent and never blocks.

What this module does not do: start processes (`emulation.demo_processes`), generate load, or draw
(`emulation.demo_view`).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import numpy.typing as npt

from contract import clock as clock_mod
from contract import signals as signals_mod
from controller import decide, metrics, pipeline, policy
from emulation import local

HOST = "127.0.0.1"

RECONCILE_S = 15.0
"""Virtual seconds between reconciles: the live controller's default interval."""

SIGNALS_TIMEOUT_S = 1.0
"""Wall seconds to wait for the balancer's /signals; a slower answer counts as no signals this reconcile."""

POLICY = policy.ObjectMeta(name="llm", namespace="demo")
"""Name and namespace the demo's policy carries (in the controller's metrics)."""


@dataclass(frozen=True)
class VirtualClock:
    """Trace time running `scale` times faster than the wall clock, from trace time `v0` at wall time `w0`."""

    v0: float
    w0: float
    scale: float
    wall: clock_mod.Clock

    def now(self) -> float:
        return self.v0 + (self.wall.monotonic() - self.w0) * self.scale

    def monotonic(self) -> float:
        return self.now()

    async def sleep(self, seconds: float) -> None:
        await self.wall.sleep(seconds / self.scale)

    async def sleep_until(self, v: float) -> None:
        delay = (v - self.now()) / self.scale
        if delay > 0:
            await self.wall.sleep(delay)


@dataclass
class DemoState:
    """What the live view shows; updated by the controller's seams."""

    vnow: float = 0.0
    demand: float = 0.0
    plan: decide.Plan | None = None
    backends: dict[str, signals_mod.BackendSignals] = field(default_factory=dict)
    admission_queue: int = 0
    events: deque[str] = field(default_factory=lambda: deque(maxlen=6))


@dataclass(frozen=True)
class ReconcileSample:
    """One reconcile as the demo saw it (virtual seconds), for the closing measurements."""

    now_s: float
    late_s: float
    """How long after its scheduled time the reconcile started (machine load shows here)."""
    demand: float
    admission_queue: int
    """Streams waiting in the balancer for a free backend slot."""
    worker_queued: int
    """Streams the workers report waiting for a decode slot (the balancer caps each at its slots, so 0)."""
    spec_replicas: int
    ready_replicas: int
    desired_replicas: int


class BalancerDemand:
    """The demand source: the balancer's `/signals`, and a history seeded from the trace and extended live."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        admin_port: int,
        step_s: float,
        history: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
        view: DemoState,
    ) -> None:
        self.http = http
        self.admin_port = admin_port
        self.step_s = step_s
        self.hist_t: list[float] = [float(t) for t in history[0]]
        self.hist_v: list[float] = [float(v) for v in history[1]]
        self.view = view
        self._bucket: list[float] = []

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        snapshot = await read_signals(self.http, self.admin_port, now)
        errors: tuple[str, ...] = ()
        if snapshot is None:
            errors = ("the balancer's /signals did not answer",)
        else:
            demand = float(snapshot.active_streams + snapshot.admission_queue)
            self._bucket.append(demand)
            self.view.demand = demand
            self.view.backends = dict(snapshot.backends)
            self.view.admission_queue = snapshot.admission_queue
        while self.hist_t and now >= self.hist_t[-1] + self.step_s:
            self.hist_t.append(self.hist_t[-1] + self.step_s)
            self.hist_v.append(max(self._bucket) if self._bucket else math.nan)
            self._bucket = []
        history = decide.DemandHistory(
            step_s=self.step_s,
            timestamps=np.asarray(self.hist_t, dtype=np.float64),
            values=np.asarray(self.hist_v, dtype=np.float64),
            fetched_s=now,
        )
        return pipeline.DemandReading(history, snapshot, errors)


class ViewReporter:
    """The reporter: metrics, the live view's events, and the timeline of reconciles."""

    def __init__(self, view: DemoState, controller_metrics: metrics.ControllerMetrics) -> None:
        self.view = view
        self.metrics = controller_metrics
        self.timeline: list[ReconcileSample] = []
        self.scheduled_s: float | None = None
        """When the current reconcile was due (set by `run` before each one)."""

    def report(self, outcome: pipeline.Outcome) -> None:
        self.metrics.observe_outcome(outcome)
        now = outcome.now
        for action in outcome.actions:
            self.view.events.append(f"{clock_mod.utc_iso(now)[11:19]} {action}")
        self.view.plan, self.view.vnow = outcome.plan, now
        signals_seen = self.view  # what the demand source read this reconcile
        self.timeline.append(
            ReconcileSample(
                now_s=now,
                late_s=max(0.0, now - self.scheduled_s) if self.scheduled_s is not None else 0.0,
                demand=signals_seen.demand,
                admission_queue=signals_seen.admission_queue,
                worker_queued=sum(b.queued_streams for b in signals_seen.backends.values()),
                spec_replicas=outcome.state.spec_replicas,
                ready_replicas=outcome.state.ready_replicas,
                desired_replicas=outcome.plan.desired_replicas,
            )
        )


async def run(
    pipe: pipeline.PolicyPipeline, reporter: ViewReporter, *, vc: VirtualClock, end_s: float
) -> None:
    """Reconcile every `RECONCILE_S` virtual seconds until `end_s`."""
    next_at = vc.now()
    while vc.now() < end_s:
        reporter.scheduled_s = next_at
        await pipe.reconcile()
        next_at += RECONCILE_S
        await vc.sleep_until(next_at)


async def read_signals(http: aiohttp.ClientSession, admin: int, now: float) -> decide.SignalsSnapshot | None:
    """The balancer's `/signals` as a snapshot stamped `now` (virtual), or None when it did not answer."""
    try:
        async with asyncio.timeout(SIGNALS_TIMEOUT_S), http.get(f"http://{HOST}:{admin}/signals") as resp:
            if resp.status != 200:
                return None
            report = signals_mod.Signals.model_validate_json(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return decide.SignalsSnapshot(
        time_s=now,
        backends=signals_mod.merge([report]),
        admission_queue=report.admission_queue,
        rejected_streams_total=report.rejected_streams_total,
    )


async def tick(cl: local.LocalCluster, *, vc: VirtualClock, end_s: float) -> None:
    """Move the local cluster along (nodes, pods, backends file) five times a second."""
    while (now := vc.now()) < end_s:
        cl.tick(now)
        await vc.wall.sleep(0.2)


@dataclass(frozen=True)
class SignalsSample:
    """The balancer's view at one instant (virtual seconds), for the demo's measurements."""

    now_s: float
    admission_queue: int
    active_streams: int
    ready_slots: int
    """Stream slots on Ready, undrained pods of the local cluster."""


async def sample(
    http: aiohttp.ClientSession,
    cl: local.LocalCluster,
    out: list[SignalsSample],
    *,
    admin_port: int,
    every_s: float,
    vc: VirtualClock,
    end_s: float,
) -> None:
    """Read /signals every `every_s` wall seconds into `out` (measurements only; the controller never sees it)."""
    slots = cl.spec.capacity.streams_per_replica
    while (now := vc.now()) < end_s:
        snapshot = await read_signals(http, admin_port, now)
        if snapshot is not None:
            state = cl.state()
            ready = sum(1 for p in state.pods if p.phase == "ready" and p.drain_started_s is None)
            out.append(SignalsSample(now, snapshot.admission_queue, snapshot.active_streams, ready * slots))
        await vc.wall.sleep(every_s)
