"""`forestall simulate`'s engine: replay a demand trace through Forestall and the autoscalers it replaces.

Every policy of a run sees the same streams (same arrival times, same lengths) on its own simulated cluster
(`emulation.sim.SimCluster`), ticking at the controller's reconcile interval (15 s):

- `forestall`: the product's reconcile pipeline (`controller.pipeline`, the one the Kubernetes loop runs)
  every tick, fed the demand history the policy's PromQL would return (the tick samples' maximum per
  forecast step) and the per-pod signals a balancer would report; it forecasts, decides and applies the plan
  with `controller.acting.apply_plan` (`emulation.runners.ForestallRunner`). Empty nodes go after
  `KARPENTER_CONSOLIDATE_AFTER_S`.
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
the oracles' demand) are `emulation.streams`, the policies `emulation.runners`, the figures
`emulation.results`; this module sets up the run and moves the clock.

What it does not do: model prefill, per-token decode contention, sessions, or node failures; it reports
GPU-hours of whole nodes from request to release.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from controller import policy
from emulation import results, runners, sim, streams, traces

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

POLICIES = ("forestall", "reactive", "reactive-ca", "oracle", "oracle-lead")
"""Every policy `simulate` knows, in table order. The two oracles always run."""

RECONCILE_S = 15.0
"""The controller's reconcile interval, and HPA's default sync period: the simulation's tick."""

CA_UNNEEDED_S = 600.0
"""cluster-autoscaler's default `--scale-down-unneeded-time`."""

KARPENTER_CONSOLIDATE_AFTER_S = 30.0
"""The node autoscaler under Forestall releases an empty node after this (Karpenter `consolidateAfter`)."""

ORACLE_BATCH = 40
"""The oracles take no decisions, so their demand is computed ten minutes of ticks at a time (fewer numpy
calls; the result is the same for any batch length)."""


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


def simulate(
    trace: traces.Trace,
    spec: policy.ScalingPolicySpec,
    *,
    policies: Sequence[str] = ("forestall", "reactive", "reactive-ca"),
    scale: float = 1.0,
    seed: int = 0,
    on_progress: Callable[[float], None] | None = None,
    initial_replicas: int | None = None,
    prior_history: tuple[FloatArray, FloatArray] | None = None,
) -> results.SimResult:
    """Replay `trace` through each policy (the two oracles always) on the same streams; see the module doc.

    Args:
        initial_replicas: replicas every policy starts with (Ready, on Ready nodes); default: the first five
            minutes' demand at the reactive target utilisation.
        prior_history: (step end times, demand) before the trace starts, which `forestall`'s history starts
            with (what Prometheus would already hold); default none, the forecast starts from nothing.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}: choose from {', '.join(POLICIES)}")
    start, end = trace.start_s, trace.end_s
    spt = spec.capacity.seconds_per_token
    slots = spec.capacity.streams_per_replica
    arrivals = traces.Arrivals(trace, scale=scale, seconds_per_token=spt, seed=seed)
    initial = _initial_replicas(trace, spec, scale=scale) if initial_replicas is None else initial_replicas
    running: list[runners.Runner] = []
    for name in [p for p in POLICIES if p in policies and not p.startswith("oracle")]:
        book = streams.StreamBook(slo_s=spec.slo.time_to_first_token_s, rng=random.Random(seed))
        if name == "forestall":
            c = sim.SimCluster(
                spec, seed=seed, start_s=start, node_release_after_s=KARPENTER_CONSOLIDATE_AFTER_S
            )
            running.append(
                runners.ForestallRunner(name, spec, c, book, start_s=start, end_s=end, prior=prior_history)
            )
        elif name == "reactive":
            c = sim.SimCluster(spec, seed=seed, start_s=start, node_release_after_s=0.0, instant_nodes=True)
            running.append(runners.HpaRunner(name, spec, c, book))
        else:
            c = sim.SimCluster(spec, seed=seed, start_s=start, node_release_after_s=CA_UNNEEDED_S)
            running.append(runners.HpaRunner(name, spec, c, book))
        c.bootstrap(initial)
        if isinstance(running[-1], runners.HpaRunner):
            running[-1].seed(start, initial)
    oracle = streams.Oracle(spec, start_s=start, end_s=end)

    n_ticks = math.ceil((end - start) / RECONCILE_S)
    tick_t: FloatArray = start + np.arange(n_ticks, dtype=np.float64) * RECONCILE_S
    ready = {r.name: np.zeros(n_ticks, dtype=np.int64) for r in running}
    misses = {r.name: np.zeros(n_ticks, dtype=np.int64) for r in running}
    billed = {r.name: np.zeros(n_ticks, dtype=np.int64) for r in running}
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
        for r in running:
            demand = float(r.book.act_end.size + r.book.q_arr.size)
            misses[r.name][k] = r.tick(tick, demand)
            ready[r.name][k] = r.ready_now * slots
            billed[r.name][k] = r.cluster.node_gpus()
            if isinstance(r, runners.ForestallRunner) and r.peak is not None:
                forecast[k] = r.peak.value
        if on_progress is not None and k % report_every == 0:
            on_progress(k / n_ticks)
    for r in running:
        r.cluster.advance(end)

    figures: dict[str, results.PolicyResult] = {}
    for r in running:
        b = r.book
        figures[r.name] = results.PolicyResult(
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
        figures[name] = results.PolicyResult(
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
    order = [p for p in POLICIES if p in figures]
    return results.SimResult(
        trace=trace.source,
        start_s=start,
        end_s=end,
        scale=scale,
        seed=seed,
        spec=spec,
        policies={p: figures[p] for p in order},
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
    wanted = math.ceil(concurrent / (spec.capacity.streams_per_replica * runners.HPA_TARGET_UTILIZATION))
    return min(max(wanted, spec.replicas.min), spec.replicas.max)
