"""`forestall simulate`'s engine: replay a demand trace through Forestall and the autoscalers it replaces.

Every policy of a run sees the same streams (same arrival times, same lengths) on its own simulated cluster
(`emulation.sim.SimCluster`), ticking at the controller's reconcile interval (15 s):

- `forestall`: the real `controller.decide.decide()` every tick, fed the demand history the policy's PromQL
  would return (the tick samples' maximum per forecast step), the forecast of its peak over the lead time
  (`controller.forecasting`, refreshed once per forecast step), the per-pod signals a balancer would report,
  and the cluster snapshot; the plan is applied as the live controller would (drain marks, deletion cost,
  provisioned GPUs, replicas). Empty nodes go after `KARPENTER_CONSOLIDATE_AFTER_S`.
- `reactive`: HPA's algorithm and default behaviour (15 s sync, 10% tolerance, +100%/+4 pods per 15 s,
  300 s scale-down stabilization) on demand per pod against a target utilisation, with GPU nodes available
  at once (a shared or pre-provisioned pool; billed only while pods use them). No drain: removed pods cut
  their streams.
- `reactive-ca`: the same HPA plus cluster-autoscaler: nodes are requested only for pending pods, take the
  node lead time, and go after 10 minutes unneeded.
- `oracle`: capacity equal to the demand at every instant, Ready at once (the lower bound on GPU-hours,
  without node rounding); `oracle-lead`: perfect knowledge of demand, whole nodes, each requested a full
  lead time (node + pod + model load) before it is needed and billed from the request. Both serve every
  stream on arrival; they are computed from the demand, not simulated.

The streams themselves (the FIFO queue over stream slots, placement with the balancer's picker, the SLO and
the oracles' demand) are `emulation.streams`; this module runs the policies and the clock.

What it does not do: model prefill, per-token decode contention, sessions, or node failures; it reports
GPU-hours of whole nodes from request to release.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from contract import pod_annotations
from contract import signals as signals_mod
from controller import cluster, decide, forecasting, policy
from emulation import sim, streams, traces

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

POLICIES = ("forestall", "reactive", "reactive-ca", "oracle", "oracle-lead")
"""Every policy `simulate` knows, in table order. The two oracles always run."""

RECONCILE_S = 15.0
"""The controller's reconcile interval, and HPA's default sync period: the simulation's tick."""

HPA_TARGET_UTILIZATION = 0.8
"""The reactive baselines target 80% of each replica's stream slots (a common HPA setting for GPU pods)."""

HPA_TOLERANCE = 0.1
"""HPA skips changes while the metric is within 10% of its target (kube-controller-manager's default)."""

HPA_DOWN_STABILIZATION_S = 300.0
"""HPA's default scale-down stabilization window."""

FORECAST_REFIT_S = (3600.0, 6 * 3600.0)
"""The simulated controller refits its forecast models hourly, like the live one, while it has less than a day
of history, then every 6 hours of new data: with days of history an hour changes little, and a week-long
replay refits 30 times instead of 168 (between refits each new sample is folded in cheaply)."""

CA_UNNEEDED_S = 600.0
"""cluster-autoscaler's default `--scale-down-unneeded-time`."""

KARPENTER_CONSOLIDATE_AFTER_S = 30.0
"""The node autoscaler under Forestall releases an empty node after this (Karpenter `consolidateAfter`)."""

ORACLE_BATCH = 40
"""The oracles take no decisions, so their demand is computed ten minutes of ticks at a time (fewer numpy
calls; the result is the same for any batch length)."""


# --- policies -------------------------------------------------------------------------------------------------


class Runner:
    """One simulated policy: its cluster, its streams, and what it does every reconcile."""

    name: str

    def __init__(
        self, name: str, spec: policy.ScalingPolicySpec, c: sim.SimCluster, book: streams.StreamBook
    ) -> None:
        self.name = name
        self.spec = spec
        self.cluster = c
        self.book = book
        self.slots = spec.capacity.streams_per_replica
        self.ready_now = 0
        """Ready pods at the start of the last tick."""

    def reconcile(self, now: float, demand: float) -> None:
        raise NotImplementedError

    def tick(self, tick: streams.Tick, demand: float) -> int:
        t0, t1 = tick.t0, tick.t1
        c = self.cluster
        c.advance(t0)
        self.reconcile(t0, demand)
        cut = 0
        if c.removed:
            cut = self.book.remove_pods([pid for pid, _ in c.removed])
            c.removed.clear()
        ids: list[int] = []
        coming: list[tuple[int, float]] = []
        ready = 0
        drain_key = cluster.DRAIN_ANNOTATION
        for p in c.pods.values():
            r = p.ready_s
            if r is None or r >= t1:
                continue
            if r <= t0:
                ready += 1
                if drain_key not in p.annotations:
                    ids.append(p.id)
            elif drain_key not in p.annotations:
                coming.append((p.id, r))
        self.ready_now = ready
        eligible = np.array(ids, dtype=np.int64)
        slots = c.pod_slots() if c.gpu_types else self.slots  # a mixed pool: each pod its GPU type's slots
        return cut + self.book.step(tick, eligible=eligible, slots=slots, coming=coming)


class HpaRunner(Runner):
    """HPA's replica algorithm with its default behaviour, acting through the ReplicaSet (no drain)."""

    def __init__(
        self, name: str, spec: policy.ScalingPolicySpec, c: sim.SimCluster, book: streams.StreamBook
    ) -> None:
        super().__init__(name, spec, c, book)
        self.recommendations: deque[tuple[float, int]] = deque()

    def seed(self, now: float, replicas: int) -> None:
        """The recommendation HPA would have made before the trace starts (its stabilization memory)."""
        self.recommendations.append((now, replicas))

    def reconcile(self, now: float, demand: float) -> None:
        current = self.cluster.spec_replicas
        target = HPA_TARGET_UTILIZATION * self.slots
        ratio = demand / (max(current, 1) * target)
        desired = current if abs(ratio - 1.0) <= HPA_TOLERANCE else math.ceil(demand / target)
        lo, hi = self.spec.replicas.min, self.spec.replicas.max
        desired = min(max(desired, lo), hi)
        self.recommendations.append((now, desired))
        while self.recommendations and self.recommendations[0][0] < now - HPA_DOWN_STABILIZATION_S:
            self.recommendations.popleft()
        if desired < current:
            desired = min(current, max(r for _, r in self.recommendations))
        else:
            desired = min(desired, max(2 * current, current + 4))
        if desired != current:
            self.cluster.set_replicas(desired)


class ForestallRunner(Runner):
    """The real decide() every reconcile, its plan applied as the live controller applies it."""

    def __init__(
        self,
        name: str,
        spec: policy.ScalingPolicySpec,
        c: sim.SimCluster,
        book: streams.StreamBook,
        *,
        start_s: float,
        end_s: float,
    ) -> None:
        super().__init__(name, spec, c, book)
        self.step_s = spec.forecast.step_s
        n = math.ceil((end_s - start_s) / self.step_s) + 2
        self.h_t: FloatArray = start_s + (np.arange(n, dtype=np.float64) + 1.0) * self.step_s
        """Step i holds the max of the samples in [start + i step, start + (i+1) step), labelled with its end
        (as `max_over_time(...[step])` evaluated at the end would be)."""
        self.h_v = np.full(n, np.nan)
        self.start_s = start_s
        self.n_done = 0
        """History steps complete (their max is final)."""
        self.window = max(1, int(spec.forecast.history_s / self.step_s))
        self.forecasts = forecasting.PolicyForecast(spec.forecast, refit_every_s=FORECAST_REFIT_S[0])
        self._signal_cache: dict[tuple[int, bool, int], signals_mod.BackendSignals] = {}
        self._asked: tuple[int, float] | None = None
        """(history steps, horizon) of the last forecast asked for."""
        self.peak: decide.PeakForecast | None = None
        self.plans: list[tuple[float, decide.Plan]] = []
        self.last_plan: decide.Plan | None = None

    def observe(self, now: float, demand: float) -> None:
        """A demand sample at `now` (what a 15 s scrape sees); the history keeps the max per step."""
        i = int((now - self.start_s) // self.step_s)
        if i >= self.h_v.size:
            return
        cur = self.h_v[i]
        self.h_v[i] = demand if np.isnan(cur) else max(cur, demand)

    def reconcile(self, now: float, demand: float) -> None:
        self.observe(now, demand)
        self.n_done = min(int((now - self.start_s) // self.step_s), self.h_v.size)
        lo = max(0, self.n_done - self.window)
        state = self.cluster.state()
        horizon = decide.horizon_s(self.spec, state)
        if self.n_done and (self.n_done, horizon) == self._asked and self.peak is not None:
            # Nothing new since the last call: the same forecast, restamped, as PolicyForecast itself does.
            self.peak = dataclasses.replace(self.peak, computed_s=now)
        elif self.n_done:
            fitted = self.forecasts.forecaster_
            if fitted is not None and now - self.start_s >= 86400.0:
                fitted.refit_every_s = FORECAST_REFIT_S[1]
            self.peak = self.forecasts.peak(
                self.h_t[lo : self.n_done], self.h_v[lo : self.n_done], now=now, horizon_s=horizon
            )
            self._asked = (self.n_done, horizon)
        history = decide.DemandHistory(
            step_s=self.step_s,
            timestamps=self.h_t[lo : self.n_done],
            values=self.h_v[lo : self.n_done],
            forecast=self.peak,
            fetched_s=now,
        )
        plan = decide.decide(self.spec, now, history, self._signals(now), state)
        self.last_plan = plan
        self._apply(plan, now)

    def _signals(self, now: float) -> decide.SignalsSnapshot:
        c = self.cluster
        counts = self.book.per_pod(c.next_pod_id)
        backends = {}
        cache = self._signal_cache
        for p in c.pods.values():
            if p.ready_s is None or p.ready_s > now:
                continue
            key = (p.id, c.draining(p), int(counts[p.id]) if p.id < counts.size else 0)
            b = cache.get(key)
            if b is None:
                # A pod's report is one of few (state, streams) pairs: built once, reused (pydantic is slow).
                b = cache[key] = signals_mod.BackendSignals.model_construct(
                    address=p.name,
                    pod=p.name,
                    state="draining" if key[1] else "ready",
                    active_streams=key[2],
                    queued_streams=0,
                    open_sessions=0,
                    capacity_weight=1.0,
                    ttfb_s=None,
                    hotspot_score=0.0,
                    hotspot=False,
                    hotspot_reason="",
                    draining_oldest_s=None,
                )
            backends[p.name] = b
        return decide.SignalsSnapshot(
            time_s=now,
            backends=backends,
            admission_queue=int(self.book.q_arr.size),
            rejected_streams_total=self.book.rejected,
        )

    def _apply(self, plan: decide.Plan, now: float) -> None:
        c = self.cluster
        stamp = f"{now:.0f}"
        for name in plan.drain:
            c.annotate(name, {cluster.DRAIN_ANNOTATION: stamp})
        for name in plan.undrain:
            c.annotate(name, {cluster.DRAIN_ANNOTATION: None})
        for name, weight in plan.capacity_weight.items():
            c.annotate(name, {pod_annotations.CAPACITY_WEIGHT: f"{weight:g}"})
        for name, cost in plan.deletion_cost.items():
            pod = c.pod_named(name)
            if pod is not None and pod.annotations.get(cluster.DELETION_COST_ANNOTATION) != str(cost):
                c.annotate(name, {cluster.DELETION_COST_ANNOTATION: str(cost)})
        if plan.provision_gpus != c.provisioned_gpus:
            c.provision(plan.provision_gpus)
        if plan.desired_replicas != c.spec_replicas:
            c.set_replicas(plan.desired_replicas)


# --- the run --------------------------------------------------------------------------------------------------


def default_spec() -> policy.ScalingPolicySpec:
    """The policy `forestall simulate` uses without `--policy`: a 7-13B model at 16 streams per 1-GPU replica on
    8-GPU nodes, 6 min node + 1 min pod + 2 min model load, a 2 s start target, the API's other defaults."""
    return policy.ScalingPolicySpec.model_validate(
        {
            "scaleTargetRef": {"kind": "Deployment", "name": "llm"},
            "demand": {"prometheus": {"query": "sum(forestall_balancer_active_streams)"}},
            "capacity": {"streamsPerReplica": 16, "gpusPerReplica": 1, "gpusPerNode": 8},
            "replicas": {"min": 1, "max": 1000},
            "leadTime": {"nodeProvisioningSeconds": 360, "podStartSeconds": 60, "modelLoadSeconds": 120},
        }
    )


def scale_for_peak(trace: traces.Trace, peak_streams: float, *, seconds_per_token: float) -> float:
    """The arrival scale at which the trace's busiest minute needs about `peak_streams` concurrent streams."""
    if trace.counts is not None:
        per = max(1, round(60.0 / trace.step_s))
        c = trace.counts
        window = np.convolve(c, np.ones(per), mode="valid") if c.size >= per else c
        rate = float(window.max()) / (per * trace.step_s)
    else:
        assert trace.arrival_s is not None
        per_min = np.bincount(((trace.arrival_s - trace.start_s) // 60.0).astype(np.int64))
        rate = float(per_min.max()) / 60.0
    natural = rate * traces.mean_stream_s(trace, seconds_per_token=seconds_per_token)
    if not natural > 0:
        raise ValueError(f"{trace.source}: the trace has no arrivals, so it cannot be scaled to a peak")
    return peak_streams / natural


@dataclass
class PolicyResult:
    name: str
    arrived: int
    started: int
    completed: int
    rejected: int
    cut: int
    running: int
    queued: int
    met: int
    wait_p50_s: float
    wait_p99_s: float
    gpu_hours: float
    scale_events: int

    @property
    def slo_attainment(self) -> float:
        return self.met / self.arrived if self.arrived else 1.0


@dataclass
class SimResult:
    """Everything a run produced: per-policy figures and the timelines the plot draws."""

    trace: str
    start_s: float
    end_s: float
    scale: float
    seed: int
    spec: policy.ScalingPolicySpec
    policies: dict[str, PolicyResult]
    tick_t: FloatArray
    demand_per_s: IntArray
    ready_streams: dict[str, IntArray]
    """Policy -> stream slots on Ready pods at each tick (oracles: per second)."""
    misses: dict[str, IntArray]
    """Policy -> streams that missed the SLO at each tick: waited too long, were rejected, or were cut."""
    billed_gpus: dict[str, IntArray]
    """Simulated policy -> GPUs on nodes requested and not released, at each tick."""
    forecast: FloatArray
    """Forestall's forecast quantile of the peak at each tick (NaN when it had none)."""
    wall_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        oracle = self.policies["oracle"].gpu_hours
        lead = self.policies["oracle-lead"].gpu_hours
        return {
            "policies": {
                name: {
                    "slo_attainment": r.slo_attainment,
                    "wait_p50_s": r.wait_p50_s,
                    "wait_p99_s": r.wait_p99_s,
                    "streams_arrived": r.arrived,
                    "streams_rejected": r.rejected,
                    "streams_cut": r.cut,
                    "gpu_hours": r.gpu_hours,
                    "gpu_hours_vs_oracle": r.gpu_hours / oracle if oracle > 0 else None,
                    "gpu_hours_vs_oracle_lead": r.gpu_hours / lead if lead > 0 else None,
                    "scale_events": r.scale_events,
                }
                for name, r in self.policies.items()
            },
            "trace": self.trace,
            "duration_s": self.end_s - self.start_s,
            "scale": self.scale,
            "seed": self.seed,
            "slo_time_to_first_token_s": self.spec.slo.time_to_first_token_s,
            "streams_per_replica": self.spec.capacity.streams_per_replica,
            "lead_time_s": self.spec.lead_time.total_s,
            "wall_s": self.wall_s,
        }


def simulate(
    trace: traces.Trace,
    spec: policy.ScalingPolicySpec,
    *,
    policies: Sequence[str] = ("forestall", "reactive", "reactive-ca"),
    scale: float = 1.0,
    seed: int = 0,
    on_progress: Callable[[float], None] | None = None,
) -> SimResult:
    """Replay `trace` through each policy (the two oracles always) on the same streams; see the module doc."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}: choose from {', '.join(POLICIES)}")
    start, end = trace.start_s, trace.end_s
    spt = spec.capacity.seconds_per_token
    slots = spec.capacity.streams_per_replica
    arrivals = traces.Arrivals(trace, scale=scale, seconds_per_token=spt, seed=seed)
    initial = _initial_replicas(trace, spec, scale=scale)
    runners: list[Runner] = []
    for name in [p for p in POLICIES if p in policies and not p.startswith("oracle")]:
        book = streams.StreamBook(slo_s=spec.slo.time_to_first_token_s, rng=random.Random(seed))
        if name == "forestall":
            c = sim.SimCluster(
                spec, seed=seed, start_s=start, node_release_after_s=KARPENTER_CONSOLIDATE_AFTER_S
            )
            runners.append(ForestallRunner(name, spec, c, book, start_s=start, end_s=end))
        elif name == "reactive":
            c = sim.SimCluster(spec, seed=seed, start_s=start, node_release_after_s=0.0, instant_nodes=True)
            runners.append(HpaRunner(name, spec, c, book))
        else:
            c = sim.SimCluster(spec, seed=seed, start_s=start, node_release_after_s=CA_UNNEEDED_S)
            runners.append(HpaRunner(name, spec, c, book))
        c.bootstrap(initial)
        if isinstance(runners[-1], HpaRunner):
            runners[-1].seed(start, initial)
    oracle = streams.Oracle(spec, start_s=start, end_s=end)

    n_ticks = math.ceil((end - start) / RECONCILE_S)
    tick_t: FloatArray = start + np.arange(n_ticks, dtype=np.float64) * RECONCILE_S
    ready = {r.name: np.zeros(n_ticks, dtype=np.int64) for r in runners}
    misses = {r.name: np.zeros(n_ticks, dtype=np.int64) for r in runners}
    billed = {r.name: np.zeros(n_ticks, dtype=np.int64) for r in runners}
    forecast = np.full(n_ticks, np.nan)
    report_every = max(1, n_ticks // 200)

    o_arr: list[FloatArray] = []
    o_dur: list[FloatArray] = []
    for k in range(n_ticks):
        t0 = float(tick_t[k])
        t1 = min(t0 + RECONCILE_S, end)
        arr, dur = arrivals.take(t1)
        tick = streams.Tick.of(t0, t1, arr, dur)
        o_arr.append(arr)
        o_dur.append(dur)
        if len(o_arr) == ORACLE_BATCH or k == n_ticks - 1:
            t_batch = float(tick_t[k + 1 - len(o_arr)])
            oracle.step(streams.Tick.of(t_batch, t1, np.concatenate(o_arr), np.concatenate(o_dur)))
            o_arr, o_dur = [], []
        for r in runners:
            demand = float(r.book.act_end.size + r.book.q_arr.size)
            misses[r.name][k] = r.tick(tick, demand)
            ready[r.name][k] = r.ready_now * slots
            billed[r.name][k] = r.cluster.node_gpus()
            if isinstance(r, ForestallRunner) and r.peak is not None:
                forecast[k] = r.peak.value
        if on_progress is not None and k % report_every == 0:
            on_progress(k / n_ticks)
    for r in runners:
        r.cluster.advance(end)

    results: dict[str, PolicyResult] = {}
    for r in runners:
        b = r.book
        results[r.name] = PolicyResult(
            name=r.name,
            arrived=b.arrived,
            started=b.started,
            completed=b.completed,
            rejected=b.rejected,
            cut=b.cut,
            running=int(b.act_end.size),
            queued=int(b.q_arr.size),
            met=b.met,
            wait_p50_s=b.wait_quantile(0.5),
            wait_p99_s=b.wait_quantile(0.99),
            gpu_hours=r.cluster.gpu_seconds / 3600.0,
            scale_events=r.cluster.scale_events,
        )
    total = arrivals.total
    rep = oracle.replicas_per_s()
    gpn = max(spec.capacity.gpus_per_node, spec.capacity.gpus_per_replica)
    nodes = np.ceil(rep * spec.capacity.gpus_per_replica / gpn).astype(np.int64)
    lead_s = round(spec.lead_time.total_s)
    lead_nodes = streams.forward_max(nodes, lead_s)
    for name, gpu_hours, series in (
        ("oracle", oracle.gpu_s / 3600.0, rep),
        ("oracle-lead", float(lead_nodes.sum()) * gpn / 3600.0, lead_nodes),
    ):
        results[name] = PolicyResult(
            name=name,
            arrived=total,
            started=total,
            completed=total - int(oracle.ends.size),
            rejected=0,
            cut=0,
            running=int(oracle.ends.size),
            queued=0,
            met=total,
            wait_p50_s=0.0,
            wait_p99_s=0.0,
            gpu_hours=gpu_hours,
            scale_events=int(np.count_nonzero(np.diff(series))),
        )
    ready["oracle"] = rep * slots
    ready["oracle-lead"] = lead_nodes * gpn // spec.capacity.gpus_per_replica * slots
    if on_progress is not None:
        on_progress(1.0)
    order = [p for p in POLICIES if p in results]
    return SimResult(
        trace=trace.source,
        start_s=start,
        end_s=end,
        scale=scale,
        seed=seed,
        spec=spec,
        policies={p: results[p] for p in order},
        tick_t=tick_t,
        demand_per_s=oracle.sec_max,
        ready_streams=ready,
        misses=misses,
        billed_gpus=billed,
        forecast=forecast,
    )


def _initial_replicas(trace: traces.Trace, spec: policy.ScalingPolicySpec, *, scale: float) -> int:
    """Replicas every policy starts with: the first five minutes' demand at the reactive target utilisation."""
    window = 300.0
    if trace.counts is not None:
        n = max(1, int(window // trace.step_s))
        rate = float(trace.counts[:n].sum()) / (n * trace.step_s)
    else:
        assert trace.arrival_s is not None
        rate = float(np.sum(trace.arrival_s < trace.start_s + window)) / window
    concurrent = rate * scale * traces.mean_stream_s(trace, seconds_per_token=spec.capacity.seconds_per_token)
    wanted = math.ceil(concurrent / (spec.capacity.streams_per_replica * HPA_TARGET_UTILIZATION))
    return min(max(wanted, spec.replicas.min), spec.replicas.max)
