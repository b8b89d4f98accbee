"""`forestall demo`: the whole system live on this machine, with real processes and real sockets.

What runs: the real balancer (`forestall balancer`, a subprocess), emulated GPU inference servers as local
processes (`emulation.local.LocalCluster` starts and stops them with emulated node, pod-start and model-load
delays), the controller in local mode (this module: the same `forecasting` -> `decide()` -> `acting` path as
the Kubernetes loop, with signals read from the balancer's real `/signals`), and a load generator replaying
the bundled real trace as OpenAI-style streaming requests through the balancer. With `prometheus` on PATH it
also starts Prometheus on a loopback port scraping the balancer, and at the end prints the current value of
every dashboard query.

Time: the demo runs on a virtual clock `time_scale` times faster than the wall clock (default 8x: a
six-minute GPU node arrives in 45 s). The policy, lead times, forecast and the printed figures are in
virtual (trace) seconds; each stream's tokens are relayed at the scaled speed, several tokens per chunk
(`tokens_per_chunk`) to keep a two-core machine from spending itself on the relay.

History: the controller starts with the trace's demand before the demo window as its history (what
Prometheus would hold), so the forecast has days to learn from; live samples extend it.

It stops by itself after `duration_s` wall seconds; Ctrl-C stops it early. Either way every process it
started is terminated before it returns.

What it does not do: talk to Kubernetes, or measure anything for BENCHMARKS.md (`forestall simulate` and
`bench/` do that).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from contract import clock as clock_mod
from contract import signals as signals_mod
from controller import acting, decide, forecasting, metrics, policy
from emulation import loadgen, local, processes, simulate, traces

HOST = "127.0.0.1"
POLICY_LABELS = ("demo", "llm")
"""Namespace and name the demo's policy carries in the controller's metrics."""
RECONCILE_S = 15.0
"""Virtual seconds between reconciles: the live controller's default interval."""

WINDOW_S = 6 * 3600.0
"""Virtual seconds of the trace the start-point search looks at ahead (a morning ramp fits)."""


@dataclass(frozen=True)
class VirtualClock:
    """Trace time running `scale` times faster than the wall clock, from trace time `v0` at wall time `w0`."""

    v0: float
    w0: float
    scale: float
    wall: clock_mod.Clock

    def now(self) -> float:
        return self.v0 + (self.wall.monotonic() - self.w0) * self.scale

    async def sleep_until(self, v: float) -> None:
        delay = (v - self.now()) / self.scale
        if delay > 0:
            await self.wall.sleep(delay)


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


@dataclass
class StreamStats(loadgen.Tally):
    """What the load generator saw: each stream's outcome, and the wait of each one that started (virtual s)."""

    waits_s: list[float] = field(default_factory=list)
    running: int = 0
    """Streams still open when the run ended."""


@dataclass
class DemoState:
    """What the live view shows; updated by the controller and the load generator."""

    vnow: float = 0.0
    demand: float = 0.0
    plan: decide.Plan | None = None
    backends: dict[str, signals_mod.BackendSignals] = field(default_factory=dict)
    admission_queue: int = 0
    events: deque[str] = field(default_factory=lambda: deque(maxlen=6))


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


async def run(opts: DemoOptions, *, console: Console) -> simulate.SimResult:
    """Run the demo; returns the live figures (`forestall (live)`) beside the simulated policies."""
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
        ttft_s=0.2 / opts.time_scale,
        seconds_per_token=spt * opts.tokens_per_chunk / opts.time_scale,
    )
    cl = local.LocalCluster(spec, worker=worker, backends_file=backends_file, seed=opts.seed, log_dir=workdir)
    listen, admin = processes.free_port(HOST), processes.free_port(HOST)
    procs: list[subprocess.Popen[bytes]] = []
    stats = StreamStats()
    view = DemoState(vnow=v0)
    prom_url: str | None = None
    cleanups: list[Any] = []
    try:
        # Start where a cluster would be: sized for the last hour's peak demand.
        recent = history_v[-max(1, int(3600 / spec.forecast.step_s)) :]
        initial = max(1, math.ceil(float(np.nanmax(recent)) / opts.slots)) if recent.size else 1
        cl.start(v0, initial)
        procs.append(_start_balancer(listen, admin, backends_file, workdir))
        await _wait_port(admin)
        ctl_metrics = metrics.ControllerMetrics()
        metrics_port = processes.free_port(HOST)
        runner = await _serve_metrics(ctl_metrics, metrics_port)
        cleanups.append(runner.cleanup)
        if opts.prometheus or (opts.prometheus is None and shutil.which("prometheus")):
            prom_port = processes.free_port(HOST)
            procs.append(_start_prometheus(prom_port, [admin, metrics_port], workdir))
            prom_url = f"http://{HOST}:{prom_port}"
        vc = VirtualClock(v0=v0, w0=clk.monotonic(), scale=opts.time_scale, wall=clk)

        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0),
        ) as http:
            tasks = [
                _controller(
                    spec,
                    cl,
                    http,
                    view,
                    vc=vc,
                    end_s=v_end,
                    admin=admin,
                    hist=(history_t, history_v),
                    ctl_metrics=ctl_metrics,
                ),
                _load(arrivals, stats, vc=vc, end_s=v_end, listen=listen, opts=opts, spt=spt),
                _ticker(cl, vc=vc, end_s=v_end),
            ]
            if opts.live_view:
                tasks.append(_show(view, stats, cl, console, vc=vc, end_s=v_end, spec=spec))
            async with asyncio.TaskGroup() as group:
                for coro in tasks:
                    group.create_task(coro)
        if prom_url is not None:
            await _print_dashboard_values(prom_url, console)
    finally:
        for cleanup in cleanups:
            with contextlib.suppress(Exception):
                await cleanup()
        cl.stop()
        for proc in procs:
            processes.stop_process(proc, grace_s=10.0)
        shutil.rmtree(workdir, ignore_errors=True)
    return _results(stats, cl, trace, spec, scale=scale, start_s=v0, end_s=v_end, seed=opts.seed)


# -- the controller, local mode ----------------------------------------------------------------------------


async def _controller(
    spec: policy.ScalingPolicySpec,
    cl: local.LocalCluster,
    http: aiohttp.ClientSession,
    view: DemoState,
    *,
    vc: VirtualClock,
    end_s: float,
    admin: int,
    hist: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    ctl_metrics: metrics.ControllerMetrics,
) -> None:
    """Every RECONCILE_S virtual seconds: read /signals, extend the history, forecast, decide, apply, report."""
    step = spec.forecast.step_s
    hist_t, hist_v = list(hist[0]), list(hist[1])
    fc = forecasting.PolicyForecast(spec.forecast)
    bucket: list[float] = []
    next_at = vc.now()
    while (now := vc.now()) < end_s:
        snapshot = await _read_signals(http, admin, now)
        if snapshot is not None:
            demand = float(snapshot.active_streams + snapshot.admission_queue)
            bucket.append(demand)
            view.demand, view.backends, view.admission_queue = (
                demand,
                dict(snapshot.backends),
                snapshot.admission_queue,
            )
        while hist_t and now >= hist_t[-1] + step:
            hist_t.append(hist_t[-1] + step)
            hist_v.append(max(bucket) if bucket else math.nan)
            bucket = []
        state = cl.state()
        t_arr, v_arr = np.asarray(hist_t), np.asarray(hist_v)
        horizon = decide.horizon_s(spec, state)
        peak = fc.peak(t_arr, v_arr, now=now, horizon_s=horizon)
        history = decide.DemandHistory(
            step_s=step, timestamps=t_arr, values=v_arr, forecast=peak, fetched_s=now
        )
        plan = decide.decide(spec, now, history, snapshot, state)
        ctl_metrics.observe_plan(*POLICY_LABELS, spec=spec, plan=plan, state=state, horizon_s=horizon)
        for line in acting.apply_plan(cl, plan, state, now=now):
            view.events.append(f"{_clock(now)} {line}")
            if line.startswith("drain "):
                ctl_metrics.child(ctl_metrics.drains, *POLICY_LABELS).inc()
        view.plan, view.vnow = plan, now
        next_at += RECONCILE_S
        await vc.sleep_until(next_at)


async def _read_signals(http: aiohttp.ClientSession, admin: int, now: float) -> decide.SignalsSnapshot | None:
    try:
        async with asyncio.timeout(1.0), http.get(f"http://{HOST}:{admin}/signals") as resp:
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


async def _ticker(cl: local.LocalCluster, *, vc: VirtualClock, end_s: float) -> None:
    """Move the local cluster along (nodes, pods, backends file) five times a second."""
    while (now := vc.now()) < end_s:
        cl.tick(now)
        await vc.wall.sleep(0.2)


# -- the load generator ----------------------------------------------------------------------------------


async def _load(
    arrivals: traces.Arrivals,
    stats: StreamStats,
    *,
    vc: VirtualClock,
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
                task = asyncio.create_task(
                    _one_stream((HOST, listen), chunks, stats, vc=vc, arrived=float(t))
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
    target: tuple[str, int], chunks: int, stats: StreamStats, *, vc: VirtualClock, arrived: float
) -> None:
    """One stream of `chunks` events through the balancer, its wait stamped at its first event."""
    stats.started += 1

    def first_event() -> None:
        stats.waits_s.append(max(0.0, vc.now() - arrived))

    stats.add(await loadgen.stream(target, max_tokens=chunks, model="demo", on_first_event=first_event))


# -- the view ---------------------------------------------------------------------------------------------


async def _show(
    view: DemoState,
    stats: StreamStats,
    cl: local.LocalCluster,
    console: Console,
    *,
    vc: VirtualClock,
    end_s: float,
    spec: policy.ScalingPolicySpec,
) -> None:
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while vc.now() < end_s:
            live.update(_render(view, stats, cl, spec))
            await vc.wall.sleep(0.25)
        live.update(_render(view, stats, cl, spec))


def _render(
    view: DemoState, stats: StreamStats, cl: local.LocalCluster, spec: policy.ScalingPolicySpec
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
) -> simulate.SimResult:
    """The live figures beside the same window through the simulator (same arrivals, same seed), for the
    policies a live demo cannot run side by side: reactive, reactive-ca and the oracles."""
    waits = np.asarray(stats.waits_s) if stats.waits_s else np.zeros(1)
    slo = spec.slo.time_to_first_token_s
    live = simulate.PolicyResult(
        name="forestall (live)",
        arrived=stats.started,
        started=len(stats.waits_s),
        completed=stats.ok,
        rejected=stats.rejected + stats.error,
        cut=stats.cut,
        running=stats.running,
        queued=0,
        met=int((np.asarray(stats.waits_s) <= slo).sum()) if stats.waits_s else 0,
        wait_p50_s=float(np.percentile(waits, 50)),
        wait_p99_s=float(np.percentile(waits, 99)),
        gpu_hours=cl.gpu_seconds / 3600,
        scale_events=cl.scale_events,
    )
    simulated = simulate.simulate(_window(trace, start_s, end_s), spec, scale=scale, seed=seed)
    renamed = {
        name if name.startswith("oracle") else f"{name} (simulated)": r
        for name, r in simulated.policies.items()
    }
    return dataclasses.replace(simulated, policies={live.name: live, **renamed})


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


# -- processes --------------------------------------------------------------------------------------------


def _start_balancer(listen: int, admin: int, backends_file: Path, workdir: Path) -> subprocess.Popen[bytes]:
    with open(workdir / "balancer.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return _popen(
            [
                sys.executable,
                "-m",
                "forestall.cli",
                "balancer",
                "--listen",
                f"{HOST}:{listen}",
                "--admin-listen",
                f"{HOST}:{admin}",
                "--backends-file",
                str(backends_file),
            ],
            log,
        )


def _start_prometheus(port: int, targets: list[int], workdir: Path) -> subprocess.Popen[bytes]:
    """Prometheus scraping the balancer's admin port and the demo controller's metrics every second."""
    config = workdir / "prometheus.yml"
    listed = ", ".join(f"'{HOST}:{t}'" for t in targets)
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: forestall\n    honor_labels: true\n    static_configs: [{{targets: [{listed}]}}]\n"
    )
    with open(workdir / "prometheus.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return _popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={HOST}:{port}",
            ],
            log,
        )


async def _print_dashboard_values(url: str, console: Console) -> None:
    """Print the current value of every dashboard query that has data (the balancer's, in the demo)."""
    try:
        from dashboards import generate  # the dashboards package lives beside the three in a source checkout
    except ImportError:
        console.print("[dim]dashboards package not found: skipping the dashboard queries[/]")
        return
    table = Table(title="dashboard queries now (Prometheus on loopback)")
    for column in ("dashboard", "panel", "value"):
        table.add_column(column)
    async with aiohttp.ClientSession() as http:
        # A few minutes of data: rates over 30 s, ranges over the demo so far.
        values = {**generate.SUBSTITUTIONS, "$__rate_interval": "30s", "$__range": "5m"}
        for dashboard, panel, expr in generate.queries():
            query = generate.substitute(expr, values)
            try:
                async with http.get(f"{url}/api/v1/query", params={"query": query}) as resp:
                    data = await resp.json()
            except (aiohttp.ClientError, ValueError):
                continue
            result = data.get("data", {}).get("result", [])
            if result:
                value = ", ".join(f"{float(r['value'][1]):.3g}" for r in result[:4])
                table.add_row(dashboard, panel, value)
    console.print(table)


async def _serve_metrics(registry: metrics.ControllerMetrics, port: int) -> web.AppRunner:
    """The demo controller's /metrics on a loopback port, served from this event loop."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    async def handler(request: web.Request) -> web.Response:
        body = generate_latest(registry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner


def _popen(argv: list[str], log: Any) -> subprocess.Popen[bytes]:
    """A child in its own session (so Ctrl-C reaches it only through us), output to `log`."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


async def _wait_port(port: int, *, attempts: int = 200) -> None:
    for _ in range(attempts):
        if processes.listening(HOST, port):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port}: the balancer did not start (see its log)")
