"""The policies `forestall simulate` runs, one `Runner` each, on its own simulated cluster and stream book.

- `ForestallRunner`: the product. Each tick it reconciles through `controller.pipeline.PolicyPipeline`, the
  same pipeline the Kubernetes loop and `forestall demo` run: cluster state, the demand source (this runner:
  the history the policy's PromQL would return, the tick samples' maximum per forecast step, and the per-pod
  signals a balancer would report), the forecast (`controller.forecasting`), `decide()`, `apply_plan` on the
  `emulation.sim.SimCluster`, and the report (the runner keeps the last plan). Seams run inline: nothing
  blocks, and `pipeline.run_inline` drives the reconcile without an event loop.
- `HpaRunner`: HPA's replica algorithm and default behaviour (15 s sync, 10% tolerance, +100%/+4 pods per
  15 s, 300 s scale-down stabilization) on demand per pod against a target utilisation, acting through the
  ReplicaSet (no drain: removed pods cut their streams).

Every runner moves its streams the same way (`Runner.tick`: the cluster advances, the policy reconciles,
removed pods' streams are cut, the stream book steps over the pods Ready and not draining).

What this module does not do: run the clock or the oracles (`emulation.simulate`), or model pods and nodes
(`emulation.sim`) or streams (`emulation.streams`).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import numpy.typing as npt

from contract import signals as signals_mod
from controller import cluster, decide, forecasting, pipeline, policy
from emulation import sim, streams

FloatArray = npt.NDArray[np.float64]

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
    """The product's reconcile pipeline every tick, with this runner as its demand source and reporter."""

    def __init__(
        self,
        name: str,
        spec: policy.ScalingPolicySpec,
        c: sim.SimCluster,
        book: streams.StreamBook,
        *,
        start_s: float,
        end_s: float,
        prior: tuple[FloatArray, FloatArray] | None = None,
    ) -> None:
        super().__init__(name, spec, c, book)
        self.step_s = spec.forecast.step_s
        self.m = 0
        """Steps of history from before the run (`prior`), at the front of `h_t`/`h_v`."""
        self.grid0_s = start_s
        """Start of the first step after `prior` (its last label: the run's steps continue its grid, or the
        forecaster would refuse the history as off-grid)."""
        if prior is not None and prior[0].size:
            self.m = int(prior[0].size)
            self.grid0_s = float(prior[0][-1])
        n = math.ceil((end_s - self.grid0_s) / self.step_s) + 2
        self.h_t: FloatArray = self.grid0_s + (np.arange(n, dtype=np.float64) + 1.0) * self.step_s
        """Step `m + i` holds the max of the samples in [grid0 + i step, grid0 + (i+1) step), labelled with
        its end (as `max_over_time(...[step])` evaluated at the end would be); the `m` before are `prior`."""
        self.h_v = np.full(n, np.nan)
        if self.m:
            assert prior is not None
            self.h_t = np.concatenate([np.asarray(prior[0], dtype=np.float64), self.h_t])
            self.h_v = np.concatenate([np.asarray(prior[1], dtype=np.float64), self.h_v])
        self.start_s = start_s
        self.n_done = 0
        """History steps complete (their max is final)."""
        self.window = max(1, int(spec.forecast.history_s / self.step_s))
        self._signal_cache: dict[tuple[int, bool, int], signals_mod.BackendSignals] = {}
        self.clock = SimClock(start_s)
        self.pipeline = pipeline.PolicyPipeline(
            policy.ScalingPolicy(metadata=policy.ObjectMeta(name=name, namespace="simulate"), spec=spec),
            cluster=c,
            demand=self,
            reporter=self,
            clock=self.clock,
            forecasts=_forecaster,
        )
        self.peak: decide.PeakForecast | None = None
        """The forecast of the last reconcile (None when there was none), for the plot."""
        self.last_plan: decide.Plan | None = None

    def observe(self, now: float, demand: float) -> None:
        """A demand sample at `now` (what a 15 s scrape sees); the history keeps the max per step."""
        i = self.m + int((now - self.grid0_s) // self.step_s)
        if i >= self.h_v.size:
            return
        cur = self.h_v[i]
        self.h_v[i] = demand if np.isnan(cur) else max(cur, demand)

    def reconcile(self, now: float, demand: float) -> None:
        self.observe(now, demand)
        self.n_done = max(0, min(self.m + int((now - self.grid0_s) // self.step_s), self.h_v.size))
        self.clock.now_s = now
        pipeline.run_inline(self.pipeline.reconcile())
        self.peak = self.pipeline.forecast_.last_

    # --- the pipeline's seams ---------------------------------------------------------------------------------

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        """The demand source: the complete history steps of the window, and the signals of now."""
        lo = max(0, self.n_done - self.window)
        history = decide.DemandHistory(
            step_s=self.step_s,
            timestamps=self.h_t[lo : self.n_done],
            values=self.h_v[lo : self.n_done],
            fetched_s=now,
        )
        return pipeline.DemandReading(history, self._signals(now))

    def report(self, outcome: pipeline.Outcome) -> None:
        """The reporter: the simulator keeps the last plan (figures come from the cluster and the streams)."""
        self.last_plan = outcome.plan

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


class SimClock:
    """The simulated time the pipeline reads: set by the runner before each reconcile."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def now(self) -> float:
        return self.now_s

    def monotonic(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        raise RuntimeError("the simulator's pipeline never sleeps: time moves only between reconciles")


def _forecaster(scaling_policy: policy.ScalingPolicy) -> forecasting.PolicyForecast:
    """The product's forecaster, refitting hourly and every 6 hours once it has a day (`FORECAST_REFIT_S`)."""
    return forecasting.PolicyForecast(
        scaling_policy.spec.forecast,
        refit_every_s=FORECAST_REFIT_S[0],
        refit_every_long_s=FORECAST_REFIT_S[1],
    )
