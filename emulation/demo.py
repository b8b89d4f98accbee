"""`forestall demo`: the whole system live on this machine, with real processes and real sockets.

What runs: the real balancer (`forestall balancer`, a subprocess), emulated GPU inference servers as local
processes (`emulation.local.LocalCluster` starts and stops them with emulated node, pod-start and model-load
delays), the controller in local mode (`controller.pipeline`, the Kubernetes loop's reconcile, with the local
seams of `emulation.demo_controller`: signals read from the balancer's real `/signals`), and a load generator replaying
the bundled real trace as OpenAI-style streaming requests through the balancer. With `prometheus` on PATH it
also starts Prometheus on a loopback port scraping the balancer, and at the end prints the current value of
every dashboard query.

Time: the demo runs on a virtual clock `time_scale` times faster than the wall clock (default 8x: a
six-minute GPU node arrives in 45 s). The policy, lead times, forecast and the printed figures are in
virtual (trace) seconds; each stream's tokens are relayed at the scaled speed, several tokens per chunk
(`tokens_per_chunk`) to keep a two-core machine from spending itself on the relay.

History: the controller starts with the trace's demand before the demo window as its history (what
Prometheus would hold), so the forecast has days to learn from; live samples extend it.

The closing table puts the live row beside the same window simulated: the simulated policies start where the
live run started (its replicas, its history) and replay the very streams the load generator sent, so the
rows differ by the cluster model and the machine only (`bench/demo_gap.py` measures by how much, and why).
This module runs the demo and generates the load; the controller's seams, the child processes and the view
are `demo_controller`, `demo_processes` and `demo_view`.

It stops by itself after `duration_s` wall seconds; Ctrl-C stops it early. Either way every process it
started is terminated before it returns.

What it does not do: talk to Kubernetes, or record anything in BENCHMARKS.md (`bench/demo_gap.py` does, from
`run_measured`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console

from contract import clock as clock_mod
from controller import metrics, pipeline, policy
from emulation import (
    demo_controller,
    demo_processes,
    demo_view,
    loadgen,
    local,
    processes,
    results,
    simulate,
    traces,
)

HOST = "127.0.0.1"

PREFILL_S = 0.2
"""Virtual seconds each emulated worker spends before a stream's first token (prefill). The simulator models no
prefill (a stream's wait ends when a slot takes it), so the live row reports waits without it: both rows then
measure the same thing, the time a stream waited for a slot (plus what the machine adds)."""

WINDOW_S = 6 * 3600.0
"""Virtual seconds of the trace the start-point search looks at ahead (a morning ramp fits)."""


@dataclass(frozen=True)
class DemoOptions:
    """What `forestall demo` was asked for; see `demo_cli` for each option's meaning."""

    duration_s: float = 180.0
    time_scale: float = 8.0
    peak_streams: float = 24.0
    slots: int = 6
    tokens_per_chunk: int = 8
    seed: int = 0
    trace: Path | None = None
    prometheus: bool | None = None
    """None: use Prometheus when it is on PATH."""
    live_view: bool = True
    sample_s: float | None = None
    """Wall seconds between extra reads of the balancer's /signals for measurements (None: no sampling)."""


@dataclass
class StreamStats(loadgen.Tally):
    """What the load generator saw: each stream's outcome (`loadgen.Tally`), and the wait of each one that
    started (virtual seconds)."""

    waits_s: list[float] = field(default_factory=list)
    sent: list[tuple[float, int]] = field(default_factory=list)
    """(arrival, output tokens) of every stream sent, tokens rounded up to whole chunks as relayed: the
    simulated rows replay exactly these streams."""
    stretch: list[float] = field(default_factory=list)
    """Per completed stream: virtual seconds from first to last byte over the trace's stream length (1.0 when
    the machine keeps up; above 1 the stream held its slot longer than the simulator's copy does)."""
    arrivals_s: list[float] = field(default_factory=list)
    """Arrival time of each stream in `waits_s` (same order), to tell when the waits happened."""
    running: int = 0
    """Streams still open when the run ended."""


def demo_spec(opts: DemoOptions) -> policy.ScalingPolicySpec:
    """The policy the demo runs: simulate's default, sized for a handful of local worker processes."""
    base = simulate.default_spec()
    return base.model_copy(
        update={
            "capacity": base.capacity.model_copy(update={"streams_per_replica": opts.slots}),
            "replicas": policy.Replicas(min=1, max=12),
            "scale_down": policy.ScaleDown(stabilization_window_s=300.0, drain_timeout_s=300.0),
        }
    )


@dataclass
class DemoRun:
    """What a demo run leaves behind besides its table: the streams and every reconcile, for measurements."""

    stats: StreamStats
    timeline: list[demo_controller.ReconcileSample]
    result: results.SimResult
    samples: list[demo_controller.SignalsSample] = field(default_factory=list)
    """The balancer's queue and Ready slots every `DemoOptions.sample_s` (empty without sampling)."""


async def run(opts: DemoOptions, *, console: Console) -> results.SimResult:
    """Run the demo; returns the live figures (`forestall (live)`) beside the simulated policies."""
    return (await run_measured(opts, console=console)).result


async def run_measured(opts: DemoOptions, *, console: Console) -> DemoRun:
    """Run the demo, keeping the per-stream waits and the reconcile timeline beside the table."""
    clk = clock_mod.SYSTEM
    spec = demo_spec(opts)
    trace = traces.read_trace(opts.trace or traces.bundled_trace_path())
    spt = spec.capacity.seconds_per_token
    scale = simulate.scale_for_peak(trace, opts.peak_streams, seconds_per_token=spt)
    v0 = _ramp_start(trace, window_s=opts.duration_s * opts.time_scale)
    v_end = v0 + opts.duration_s * opts.time_scale
    arrivals = traces.Arrivals(trace, scale=scale, seconds_per_token=spt, seed=opts.seed)
    arrivals.take(v0)  # skip to the demo window; everything before it is history
    history_t, history_v = _seed_history(trace, spec, scale=scale, until_s=v0)

    workdir = Path(tempfile.mkdtemp(prefix="forestall-demo-"))
    backends_file = workdir / "backends.json"
    backends_file.write_text(json.dumps({"backends": []}))
    worker = local.WorkerSpec(
        slots=opts.slots,
        ttft_s=PREFILL_S / opts.time_scale,
        seconds_per_token=spt * opts.tokens_per_chunk / opts.time_scale,
    )
    cl = local.LocalCluster(spec, worker=worker, backends_file=backends_file, seed=opts.seed, log_dir=workdir)
    listen, admin = processes.free_port(HOST), processes.free_port(HOST)
    procs: list[subprocess.Popen[bytes]] = []
    stats = StreamStats()
    view = demo_controller.DemoState(vnow=v0)
    samples: list[demo_controller.SignalsSample] = []
    reporter: demo_controller.ViewReporter | None = None
    prom_url: str | None = None
    cleanups: list[Any] = []
    try:
        # Start where a cluster would be: sized for the last hour's peak demand.
        initial = initial_replicas(history_v, spec)
        cl.start(v0, initial)
        procs.append(
            demo_processes.start_balancer(listen, admin, backends_file, workdir, time_scale=opts.time_scale)
        )
        await demo_processes.wait_port(admin)
        ctl_metrics = metrics.ControllerMetrics()
        metrics_port = processes.free_port(HOST)
        runner = await demo_processes.serve_metrics(ctl_metrics, metrics_port)
        cleanups.append(runner.cleanup)
        if opts.prometheus or (opts.prometheus is None and shutil.which("prometheus")):
            prom_port = processes.free_port(HOST)
            procs.append(demo_processes.start_prometheus(prom_port, [admin, metrics_port], workdir))
            prom_url = f"http://{HOST}:{prom_port}"
        vc = demo_controller.VirtualClock(v0=v0, w0=clk.monotonic(), scale=opts.time_scale, wall=clk)

        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0),
        ) as http:
            reporter = demo_controller.ViewReporter(view, ctl_metrics)
            pipe = pipeline.PolicyPipeline(
                policy.ScalingPolicy(metadata=demo_controller.POLICY, spec=spec),
                cluster=cl,
                demand=demo_controller.BalancerDemand(
                    http,
                    admin_port=admin,
                    step_s=spec.forecast.step_s,
                    history=(history_t, history_v),
                    view=view,
                ),
                reporter=reporter,
                clock=vc,
            )
            tasks = [
                demo_controller.run(pipe, reporter, vc=vc, end_s=v_end),
                _load(arrivals, stats, vc=vc, end_s=v_end, listen=listen, opts=opts, spt=spt),
                demo_controller.tick(cl, vc=vc, end_s=v_end),
            ]
            if opts.sample_s is not None:
                tasks.append(
                    demo_controller.sample(
                        http, cl, samples, admin_port=admin, every_s=opts.sample_s, vc=vc, end_s=v_end
                    )
                )
            if opts.live_view:
                tasks.append(demo_view.show(view, stats, cl, console, vc=vc, end_s=v_end, spec=spec))
            async with asyncio.TaskGroup() as group:
                for coro in tasks:
                    group.create_task(coro)
        if prom_url is not None:
            await demo_processes.print_dashboard_values(prom_url, console)
    finally:
        for cleanup in cleanups:
            with contextlib.suppress(Exception):
                await cleanup()
        cl.stop()
        for proc in procs:
            processes.stop_process(proc, grace_s=10.0)
        shutil.rmtree(workdir, ignore_errors=True)
    result = _results(
        stats,
        cl,
        trace,
        spec,
        scale=scale,
        start_s=v0,
        end_s=v_end,
        seed=opts.seed,
        initial=initial,
        history=(history_t, history_v),
    )
    return DemoRun(stats, reporter.timeline if reporter is not None else [], result, samples)


def initial_replicas(history_v: np.ndarray[Any, Any], spec: policy.ScalingPolicySpec) -> int:
    """Where a cluster would be when the demo starts: sized for the last hour's peak demand."""
    recent = history_v[-max(1, int(3600 / spec.forecast.step_s)) :]
    slots = spec.capacity.streams_per_replica
    return max(1, math.ceil(float(np.nanmax(recent)) / slots)) if recent.size else 1


# -- the load generator ----------------------------------------------------------------------------------


async def _load(
    arrivals: traces.Arrivals,
    stats: StreamStats,
    *,
    vc: demo_controller.VirtualClock,
    end_s: float,
    listen: int,
    opts: DemoOptions,
    spt: float,
) -> None:
    """Send each arriving stream through the balancer at its (scaled) arrival time."""
    running: set[asyncio.Task[None]] = set()
    try:
        while (now := vc.now()) < end_s:
            times, durations = arrivals.take(min(now + 0.5 * opts.time_scale, end_s))
            for t, d in zip(times, durations, strict=True):
                await vc.sleep_until(float(t))
                chunks = max(1, math.ceil(d / spt / opts.tokens_per_chunk))
                stats.sent.append((float(t), chunks * opts.tokens_per_chunk))
                task = asyncio.create_task(
                    _one_stream((HOST, listen), chunks, stats, vc=vc, arrived=float(t), length_s=float(d))
                )
                running.add(task)
                task.add_done_callback(running.discard)
            if not times.size:
                await vc.wall.sleep(0.05)
    finally:
        stats.running = len(running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _one_stream(
    target: tuple[str, int],
    chunks: int,
    stats: StreamStats,
    *,
    vc: demo_controller.VirtualClock,
    arrived: float,
    length_s: float,
) -> None:
    """One stream of `chunks` events through the balancer (`loadgen.stream`), its wait stamped at its first
    event and, once complete, how long it held its slot against the trace's length."""
    stats.started += 1
    first_at = arrived

    def first_event() -> None:
        nonlocal first_at
        first_at = vc.now()
        stats.waits_s.append(max(0.0, first_at - arrived))
        stats.arrivals_s.append(arrived)

    outcome = await loadgen.stream(target, max_tokens=chunks, model="demo", on_first_event=first_event)
    stats.add(outcome)
    if outcome.kind is loadgen.StreamOutcome.OK:
        stats.stretch.append((vc.now() - first_at) / max(length_s, 1e-9))


# -- results ----------------------------------------------------------------------------------------------


def _results(
    stats: StreamStats,
    cl: local.LocalCluster,
    trace: traces.Trace,
    spec: policy.ScalingPolicySpec,
    *,
    scale: float,
    start_s: float,
    end_s: float,
    seed: int,
    initial: int,
    history: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> results.SimResult:
    """The live figures beside the same window through the simulator: same trace window, arrival scale and
    seed, and the same starting point as the live run (its initial replicas, and the history the live
    controller started with), so `forestall (simulated)` is what the live row should be without the
    machine; plus the policies a live demo cannot run side by side (reactive, reactive-ca, the oracles)."""
    waits = np.maximum(0.0, np.asarray(stats.waits_s) - PREFILL_S) if stats.waits_s else np.zeros(1)
    slo = spec.slo.time_to_first_token_s
    live = results.PolicyResult(
        name="forestall (live)",
        arrived=stats.started,
        started=len(stats.waits_s),
        completed=stats.ok,
        rejected=stats.rejected + stats.error,
        cut=stats.cut,
        running=stats.running,
        queued=0,
        met=int((waits <= slo).sum()) if stats.waits_s else 0,
        wait_p50_s=float(np.percentile(waits, 50)),
        wait_p99_s=float(np.percentile(waits, 99)),
        gpu_hours=cl.gpu_seconds / 3600,
        scale_events=cl.scale_events,
    )
    simulated = simulate.simulate(
        _sent(stats, trace, start_s, end_s) if stats.sent else _window(trace, start_s, end_s),
        spec,
        scale=scale if not stats.sent else 1.0,
        seed=seed,
        initial_replicas=initial,
        prior_history=history,
    )
    renamed = {
        name if name.startswith("oracle") else f"{name} (simulated)": r
        for name, r in simulated.policies.items()
    }
    return dataclasses.replace(simulated, scale=scale, policies={live.name: live, **renamed})


def _sent(stats: StreamStats, trace: traces.Trace, start_s: float, end_s: float) -> traces.Trace:
    """The streams the live run sent, as a request trace: the simulated rows replay the very same streams
    (arrival times and lengths), so the rows differ by the cluster and the machine, not by random draws."""
    arrival = np.asarray([t for t, _ in stats.sent], dtype=np.float64)
    tokens = np.asarray([n for _, n in stats.sent], dtype=np.float64)
    order = np.argsort(arrival, kind="stable")
    return traces.Trace(
        kind="requests",
        start_s=start_s,
        end_s=end_s,
        source=trace.source,
        columns=trace.columns,
        arrival_s=arrival[order],
        tokens=tokens[order],
    )


def _window(trace: traces.Trace, start_s: float, end_s: float) -> traces.Trace:
    """The part of a trace between two times (counts: whole steps; requests: the rows inside)."""
    if trace.counts is not None:
        i0 = int((start_s - trace.start_s) // trace.step_s)
        i1 = math.ceil((end_s - trace.start_s) / trace.step_s)
        return dataclasses.replace(
            trace,
            start_s=trace.start_s + i0 * trace.step_s,
            end_s=trace.start_s + i1 * trace.step_s,
            counts=trace.counts[i0:i1],
        )
    assert trace.arrival_s is not None and trace.tokens is not None
    keep = (trace.arrival_s >= start_s) & (trace.arrival_s < end_s)
    return dataclasses.replace(
        trace, start_s=start_s, end_s=end_s, arrival_s=trace.arrival_s[keep], tokens=trace.tokens[keep]
    )


def _seed_history(
    trace: traces.Trace, spec: policy.ScalingPolicySpec, *, scale: float, until_s: float
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Concurrent streams per history step before the demo starts (Little's law on the trace's arrivals)."""
    step = spec.forecast.step_s
    start = max(trace.start_s, until_s - spec.forecast.history_s)
    edges = np.arange(start, until_s + 1e-9, step)
    if edges.size < 2:
        return np.empty(0), np.empty(0)
    arrivals = traces.Arrivals(trace, scale=scale, seconds_per_token=spec.capacity.seconds_per_token, seed=1)
    t, d = arrivals.take(until_s)
    keep = t >= edges[0]
    t, d = t[keep], d[keep]
    mean_d = float(d.mean()) if d.size else 0.0
    counts, _ = np.histogram(t, bins=edges)
    return edges[1:], counts / step * mean_d


def _ramp_start(trace: traces.Trace, *, window_s: float) -> float:
    """Where the demo window starts: just before the steepest rise of demand, a day or more into the trace."""
    if trace.counts is None:
        return trace.start_s + min(3600.0, trace.duration_s / 2)
    hour = max(1, int(3600 / trace.step_s))
    rate = np.convolve(trace.counts, np.ones(hour) / hour, mode="valid")
    ahead = max(1, int(window_s / trace.step_s))
    first = int(86400 / trace.step_s)
    if rate.size <= first + ahead:
        return trace.start_s + trace.duration_s / 2
    rise = rate[first + ahead :] - rate[first : rate.size - ahead]
    best = first + int(np.argmax(rise))
    return trace.start_s + best * trace.step_s
