"""`forestall simulate`'s engine: replay a demand trace through Forestall and the autoscalers it replaces.

Every policy of a run sees the same streams (same arrival times, same lengths) on its own simulated cluster
(`controller.sim.SimCluster`), ticking at the controller's reconcile interval (15 s):

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

Streams are kept as numpy arrays per policy (end time, pod, SLO met), never one Python object per stream.
Within a tick the FIFO queue is exact: a vectorised test shows when no stream waits (the common case);
otherwise a heap of slot-free times replays the tick stream by stream. New streams are placed on pods with
the balancer's own `balancer.picking.pick` over the pods' open streams, in quanta of several streams per
pick when a tick starts many (the least-loaded spread is the same, at a fraction of the calls). A stream
meets the SLO when it starts within `slo.time_to_first_token_s` of arriving and is not cut; a stream that
waits longer than `QUEUE_TIMEOUT_S` is rejected (the balancer's admission queue answers 503).

What it does not do: model prefill, per-token decode contention, sessions, or node failures; it reports
GPU-hours of whole nodes from request to release.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from balancer import picking
from balancer import signals as signals_mod
from controller import cluster, decide, forecasting, policy, sim, traces

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

POLICIES = ("forestall", "reactive", "reactive-ca", "oracle", "oracle-lead")
"""Every policy `simulate` knows, in table order. The two oracles always run."""

RECONCILE_S = 15.0
"""The controller's reconcile interval, and HPA's default sync period: the simulation's tick."""

QUEUE_TIMEOUT_S = 60.0
"""A stream still waiting this long is rejected (the balancer's admission queue gives up and answers 503)."""

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

_EMPTY: FloatArray = np.empty(0)

ORACLE_BATCH = 40
"""The oracles take no decisions, so their demand is computed ten minutes of ticks at a time (fewer numpy
calls; the result is the same for any batch length)."""

WAIT_EDGES_S = np.concatenate([[0.0], np.geomspace(1e-3, QUEUE_TIMEOUT_S + 1.0, 240)])
"""Histogram edges for waits to start; a histogram, not a list, keeps memory flat on week-long runs."""


@dataclass(frozen=True)
class Tick:
    """One reconcile interval's arrivals, with what every policy's fast path needs computed once."""

    t0: float
    t1: float
    arr: FloatArray
    """Arrival times, sorted."""
    dur: FloatArray
    ends: FloatArray
    """Arrival + duration: when each stream would end if it started on arrival."""
    need: IntArray
    """need[k]: slots that must be free at t0 or freed by running streams by arr[k] for streams 0..k to
    start on arrival (k + 1 minus the new streams already ended by then)."""
    need_max: int
    ends_sorted: FloatArray

    @classmethod
    def of(cls, t0: float, t1: float, arr: FloatArray, dur: FloatArray) -> Tick:
        ends = arr + dur
        ends_sorted = np.sort(ends)
        need = np.arange(1, arr.size + 1) - np.searchsorted(ends_sorted, arr, side="right")
        return cls(t0, t1, arr, dur, ends, need, int(need.max(initial=0)), ends_sorted)


# --- streams ----------------------------------------------------------------------------------------------------


@dataclass
class StreamBook:
    """The streams of one policy: running (arrays), waiting (FIFO arrays) and the counters."""

    slo_s: float
    rng: random.Random
    act_end: FloatArray = field(default_factory=lambda: np.empty(0))
    act_pod: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    act_met: npt.NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, dtype=bool))
    q_arr: FloatArray = field(default_factory=lambda: np.empty(0))
    q_dur: FloatArray = field(default_factory=lambda: np.empty(0))
    arrived: int = 0
    started: int = 0
    completed: int = 0
    rejected: int = 0
    cut: int = 0
    met: int = 0
    wait_hist: IntArray = field(default_factory=lambda: np.zeros(WAIT_EDGES_S.size, dtype=np.int64))
    """Counts of waits: index 0 is exactly zero, then one bin per pair of edges."""

    def per_pod(self, n_pods: int) -> IntArray:
        return np.bincount(self.act_pod, minlength=n_pods)

    def remove_pods(self, pod_ids: Sequence[int]) -> int:
        """Cut the streams still running on removed pods; returns how many."""
        if not pod_ids or self.act_pod.size == 0:
            return 0
        mask = np.isin(self.act_pod, np.asarray(pod_ids, dtype=np.int64))
        n = int(mask.sum())
        if n:
            self.cut += n
            self.met -= int(self.act_met[mask].sum())
            keep = ~mask
            self.act_end, self.act_pod, self.act_met = (
                self.act_end[keep],
                self.act_pod[keep],
                self.act_met[keep],
            )
        return n

    def step(
        self,
        tick: Tick,
        *,
        eligible: IntArray,
        slots: int,
        coming: Sequence[tuple[int, float]],
    ) -> int:
        """Serve one tick's arrivals on pods `eligible` (ids, Ready and not draining at t0) and `coming` (id,
        ready time in the tick). Returns the SLO misses decided in it."""
        t0, t1, arr, dur = tick.t0, tick.t1, tick.arr, tick.dur
        self.arrived += arr.size
        coming_ids = np.array([p for p, _ in coming], dtype=np.int64)
        pods_t1 = np.concatenate([eligible, coming_ids]) if coming else eligible
        n_ids = max(int(self.act_pod.max(initial=-1)), int(pods_t1.max(initial=-1))) + 1
        is_elig = np.zeros(n_ids, dtype=bool)
        is_elig[pods_t1] = True
        live0 = np.bincount(self.act_pod, minlength=n_ids)
        free0 = int(np.maximum(slots - live0[eligible], 0).sum())
        ending = self.act_end <= t1
        releases = self.act_end[ending & is_elig[self.act_pod]]
        queued_before = self.q_arr.size
        cust_a = np.concatenate([self.q_arr, arr]) if queued_before else arr
        cust_d = np.concatenate([self.q_dur, dur]) if queued_before else dur
        m = cust_a.size
        misses = 0
        fast = m == 0 or (queued_before == 0 and free0 >= tick.need_max)
        supply: FloatArray | None = None
        if not fast:
            parts = [np.full(free0, t0), releases]
            if coming:
                parts.append(np.repeat(np.array([t for _, t in coming]), slots))
            supply = np.concatenate(parts)
            supply.sort()
            if queued_before == 0:
                fast = bool((np.searchsorted(supply, arr, side="right") >= tick.need).all())
        ends = tick.ends
        if fast:
            # Nobody waits: every stream starts on arrival.
            self.wait_hist[0] += m
            self.met += m
            starts = cust_a
            met_new: npt.NDArray[np.bool_] | None = None
            self.q_arr, self.q_dur = _EMPTY, _EMPTY
            self.started += m
        else:
            assert supply is not None
            starts, rejected, n_done = _replay(
                cust_a, cust_d, supply.tolist(), t1=t1, timeout_s=QUEUE_TIMEOUT_S
            )
            ok = ~np.isnan(starts)
            rest_a, rest_d = cust_a[n_done:], cust_d[n_done:]
            late = rest_a + QUEUE_TIMEOUT_S <= t1  # still waiting, past the admission timeout: rejected
            rejected_n = int(rejected.sum()) + int(late.sum())
            self.rejected += rejected_n
            self.q_arr, self.q_dur = rest_a[~late], rest_d[~late]
            waits = (starts - cust_a)[ok]
            met_ok = waits <= self.slo_s + 1e-9
            self.met += int(met_ok.sum())
            zero = waits <= 0.0
            self.wait_hist[0] += int(zero.sum())
            if not zero.all():
                idx = np.searchsorted(WAIT_EDGES_S, waits[~zero], side="left")
                self.wait_hist += np.bincount(
                    np.minimum(idx, WAIT_EDGES_S.size - 1), minlength=WAIT_EDGES_S.size
                )
            misses = int((~met_ok).sum()) + rejected_n
            starts, cust_d, met_new = starts[ok], cust_d[ok], met_ok
            self.started += int(ok.sum())
            ends = starts + cust_d

        # Streams that ended by t1 leave; those still running at t1 are placed on pods.
        n_end_old = int(ending.sum())
        if n_end_old:
            keep = ~ending
            self.act_end, self.act_pod, self.act_met = (
                self.act_end[keep],
                self.act_pod[keep],
                self.act_met[keep],
            )
        live = ends > t1
        n_live = int(live.sum())
        self.completed += n_end_old + ends.size - n_live
        if n_live:
            load = np.bincount(self.act_pod, minlength=n_ids)[pods_t1]
            placed = place(n_live, pods_t1, load, slots=slots, rng=self.rng)
            self.act_end = np.concatenate([self.act_end, ends[live]])
            self.act_pod = np.concatenate([self.act_pod, placed])
            new_met = np.ones(n_live, dtype=bool) if met_new is None else met_new[live]
            self.act_met = np.concatenate([self.act_met, new_met])
        return misses

    def wait_quantile(self, q: float) -> float:
        """Wait to start at quantile q of started streams, from the histogram (upper bin edge)."""
        total = int(self.wait_hist.sum())
        if total == 0:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.wait_hist), q * total, side="left"))
        return float(WAIT_EDGES_S[min(k, WAIT_EDGES_S.size - 1)])


def _replay(
    cust_a: FloatArray, cust_d: FloatArray, heap: list[float], *, t1: float, timeout_s: float
) -> tuple[FloatArray, npt.NDArray[np.bool_], int]:
    """FIFO multi-slot queue for one tick, stream by stream: each takes the earliest free slot.

    Returns start times (NaN when not started), the rejected mask, and how many customers were decided
    (started or rejected); the rest are still waiting at t1."""
    m = cust_a.size
    starts = np.full(m, np.nan)
    rejected = np.zeros(m, dtype=bool)
    a_list, d_list = cust_a.tolist(), cust_d.tolist()
    k = 0
    while k < m:
        if not heap or heap[0] >= t1:
            break
        a = a_list[k]
        s = heap[0] if heap[0] > a else a
        if s - a > timeout_s:
            rejected[k] = True
            k += 1
            continue
        e = s + d_list[k]
        if e < t1:
            heapq.heapreplace(heap, e)
        else:
            heapq.heappop(heap)
        starts[k] = s
        k += 1
    return starts, rejected, k


PICK_EACH_MAX = 64
"""Up to this many new streams in a tick are placed one `picking.pick` call each; above it, in bulk."""


def place(n: int, pods: IntArray, load: IntArray, *, slots: int, rng: random.Random) -> IntArray:
    """Place `n` new streams on `pods` (open streams `load` each, `slots` at most) as the balancer would.

    Few streams: one `balancer.picking.pick` per stream over the pods with a free slot, each pick seeing the
    previous ones. Many streams (a busy tick at full scale): the same least-loaded rule applied in bulk,
    which is what repeated picks converge to: the least loaded pods are filled up to a common level
    (water-filling), and the streams left over go one each to pods at that level, in random order (the
    picker's tie-break among equals). `tests/unit/test_sim_engine.py` checks the two agree."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if pods.size == 0:
        return np.full(n, -1, dtype=np.int64)
    if n <= PICK_EACH_MAX:
        return _place_each(n, pods, load, slots=slots, rng=rng)
    load = load.astype(np.int64)
    room = np.maximum(slots - load, 0)
    if int(room.sum()) <= n:
        take = room.copy()
        take[int(np.argmin(load))] += n - int(room.sum())  # more streams than slots: the least loaded waits
        return np.repeat(pods, take)
    levels = np.arange(int(load.min()), slots + 1)
    fill = np.minimum(np.maximum(levels[:, None] - load[None, :], 0), room[None, :]).sum(axis=1)
    lo = int(levels[int(np.searchsorted(fill, n, side="right")) - 1])  # highest level filling <= n
    take = np.minimum(np.maximum(lo - load, 0), room)
    left = n - int(take.sum())
    if left:
        at_level = np.flatnonzero((load + take == lo) & (take < room))
        first = rng.randrange(at_level.size)  # the picker's random tie-break among equals
        take[at_level[(first + np.arange(left)) % at_level.size]] += 1
    return np.repeat(pods, take)


def _place_each(n: int, pods: IntArray, load: IntArray, *, slots: int, rng: random.Random) -> IntArray:
    loads = load.tolist()
    cands = [picking.Candidate(key=str(i), active=loads[i]) for i in range(pods.size) if loads[i] < slots]
    out = np.empty(n, dtype=np.int64)
    for k in range(n):
        if not cands:
            i = int(np.argmin(loads))
        else:
            c = picking.pick(cands, rng=rng)
            assert c is not None
            i = int(c.key)
            j = next(j for j, x in enumerate(cands) if x is c)
            if loads[i] + 1 < slots:
                cands[j] = picking.Candidate(key=c.key, active=loads[i] + 1)
            else:
                cands[j] = cands[-1]
                cands.pop()
        loads[i] += 1
        out[k] = pods[i]
    return out


# --- policies -------------------------------------------------------------------------------------------------


class Runner:
    """One simulated policy: its cluster, its streams, and what it does every reconcile."""

    name: str

    def __init__(
        self, name: str, spec: policy.ScalingPolicySpec, c: sim.SimCluster, book: StreamBook
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

    def tick(self, tick: Tick, demand: float) -> int:
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
        return cut + self.book.step(tick, eligible=eligible, slots=self.slots, coming=coming)


class HpaRunner(Runner):
    """HPA's replica algorithm with its default behaviour, acting through the ReplicaSet (no drain)."""

    def __init__(
        self, name: str, spec: policy.ScalingPolicySpec, c: sim.SimCluster, book: StreamBook
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
        book: StreamBook,
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
        for name, cost in plan.deletion_cost.items():
            pod = c.pod_named(name)
            if pod is not None and pod.annotations.get(cluster.DELETION_COST_ANNOTATION) != str(cost):
                c.annotate(name, {cluster.DELETION_COST_ANNOTATION: str(cost)})
        if plan.provision_gpus != c.provisioned_gpus:
            c.provision(plan.provision_gpus)
        if plan.desired_replicas != c.spec_replicas:
            c.set_replicas(plan.desired_replicas)


# --- oracles --------------------------------------------------------------------------------------------------


class Oracle:
    """Demand served on arrival, per second: the most streams open at any instant of each second.

    `oracle` holds exactly the replicas each second's peak needs; `oracle-lead` derives from the same series.
    """

    def __init__(self, spec: policy.ScalingPolicySpec, *, start_s: float, end_s: float) -> None:
        self.slots = spec.capacity.streams_per_replica
        self.gpr = spec.capacity.gpus_per_replica
        self.start_s = start_s
        self.ends: FloatArray = np.empty(0)
        """End times of the streams running, sorted."""
        self.sec_max = np.zeros(math.ceil(end_s - start_s) + 1, dtype=np.int64)

    def step(self, tick: Tick) -> None:
        old = self.ends
        arr = tick.arr
        s0 = math.floor(tick.t0 - self.start_s)
        s1 = min(math.ceil(tick.t1 - self.start_s), self.sec_max.size)
        sec = self.start_s + np.arange(s0, s1, dtype=np.float64)
        # Open streams at each second's start, and just after each arrival.
        new_ends = tick.ends_sorted
        first = np.searchsorted(arr, sec, side="left")
        at_sec = (
            first
            - np.searchsorted(new_ends, sec, side="right")
            + (old.size - np.searchsorted(old, sec, side="right"))
        )
        peak = at_sec
        if arr.size:
            at_arr = tick.need + (old.size - np.searchsorted(old, arr, side="right"))
            has = np.diff(np.append(first, arr.size)) > 0
            if has.any():
                red = np.maximum.reduceat(at_arr, np.minimum(first, arr.size - 1))
                peak = np.where(has, np.maximum(at_sec, red), at_sec)
        np.maximum(self.sec_max[s0:s1], peak, out=self.sec_max[s0:s1])
        keep = np.concatenate([old[old > tick.t1], new_ends[new_ends > tick.t1]])
        keep.sort()
        self.ends = keep

    @property
    def gpu_s(self) -> float:
        return float(self.replicas_per_s().sum()) * self.gpr

    def replicas_per_s(self) -> IntArray:
        return np.ceil(self.sec_max / self.slots).astype(np.int64)


def forward_max(x: IntArray, window: int) -> IntArray:
    """out[i] = max(x[i : i + window + 1]): what must be billed now to have x ready `window` steps later."""
    if window <= 0 or x.size == 0:
        return x.copy()
    w = window + 1
    n = x.size
    pad = (-n) % w
    y = np.concatenate([x, np.full(pad + w, x.min(initial=0))]).reshape(-1, w)
    prefix = np.maximum.accumulate(y, axis=1).ravel()
    suffix = np.maximum.accumulate(y[:, ::-1], axis=1)[:, ::-1].ravel()
    i = np.arange(n)
    return np.maximum(suffix[i], prefix[i + w - 1])


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
        book = StreamBook(slo_s=spec.slo.time_to_first_token_s, rng=random.Random(seed))
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
    oracle = Oracle(spec, start_s=start, end_s=end)

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
        tick = Tick.of(t0, t1, arr, dur)
        o_arr.append(arr)
        o_dur.append(dur)
        if len(o_arr) == ORACLE_BATCH or k == n_ticks - 1:
            t_batch = float(tick_t[k + 1 - len(o_arr)])
            oracle.step(Tick.of(t_batch, t1, np.concatenate(o_arr), np.concatenate(o_dur)))
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
    lead_nodes = forward_max(nodes, lead_s)
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
    streams = rate * scale * traces.mean_stream_s(trace, seconds_per_token=spec.capacity.seconds_per_token)
    wanted = math.ceil(streams / (spec.capacity.streams_per_replica * HPA_TARGET_UTILIZATION))
    return min(max(wanted, spec.replicas.min), spec.replicas.max)
