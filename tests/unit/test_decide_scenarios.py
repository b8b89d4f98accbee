"""`decide()` driven over time against a `FakeCluster`: ramp, spike, drop, weekly cycle, demand coming back.

A small world moves with a `FakeClock`: pods become ready a fixed lead time after they are created, demand is
spread evenly over ready pods that are not draining (the balancer's job), streams on a drained pod finish
within `STREAM_S`, and each reconcile applies the plan the way the controller does (drain marks, undrain,
deletion cost, then replicas). The forecast is given by each test: perfect knowledge of the future or none.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from contract import signals as sig
from contract.clock import FakeClock
from controller import acting, cluster, decide, policy
from tests.fakes.cluster import FakeCluster
from tests.unit.test_decide import SPR, make_spec

LEAD_S = 480.0
"""Pod created -> Ready in this world; also the policy's horizon (300 + 60 + 120)."""

STREAM_S = 90.0
"""Streams left on a drained pod have all finished this long after the mark."""

Demand = Callable[[float], float]


class World:
    """A cluster, its demand, and the controller's reconcile, stepped by a FakeClock."""

    def __init__(
        self,
        spec: policy.ScalingPolicySpec,
        demand: Demand,
        *,
        step_s: float = 60.0,
        replicas: int = 1,
        forecast: str = "perfect",
    ) -> None:
        self.spec, self.demand, self.step_s, self.forecast = spec, demand, step_s, forecast
        self.clock = FakeClock()
        self.t0 = self.clock.now()
        pods = tuple(
            cluster.PodState(name=f"seed-{i}", phase="ready", created_s=self.t0 - LEAD_S, ready_s=self.t0)
            for i in range(replicas)
        )
        self.fake = FakeCluster(cluster.ClusterState(spec_replicas=replicas, pods=pods), now_s=self.t0)
        self.ts: list[float] = []
        self.vs: list[float] = []
        self.drain_load: dict[str, tuple[float, int]] = {}
        """Pod -> (mark time, streams it carried then)."""
        self.plans: list[decide.Plan] = []
        self.shortfall_steps = 0
        self.removed_with_streams = 0
        self.drain_marks: list[float] = []
        self.gpu_pod_s = 0.0
        self.oracle_pod_s = 0.0

    def loads(self, now: float) -> dict[str, int]:
        ready = [p for p in self.fake.current.pods if p.phase == "ready"]
        serving = [p for p in ready if p.drain_started_s is None]
        out: dict[str, int] = {}
        for p in ready:
            if p.drain_started_s is not None:
                at, carried = self.drain_load.get(p.name, (p.drain_started_s, 0))
                out[p.name] = max(0, math.ceil(carried * (1 - (now - at) / STREAM_S)))
        # Streams still finishing on drained pods are part of demand; the rest goes to the serving pods.
        total = max(0, round(self.demand(now)) - sum(out.values()))
        for i, p in enumerate(serving):
            out[p.name] = total // len(serving) + (1 if i < total % len(serving) else 0)
        return out

    def step(self) -> decide.Plan:
        now = self.clock.now()
        self.fake.now_s = now
        for p in self.fake.current.pods:
            if p.phase == "pending" and now - p.created_s >= LEAD_S:
                self.fake.set_phase(p.name, "ready", at_s=now)
        demand = self.demand(now)
        self.ts.append(now)
        self.vs.append(demand)
        loads = self.loads(now)
        serving_ready = sum(
            1 for p in self.fake.current.pods if p.phase == "ready" and p.drain_started_s is None
        )
        if serving_ready * SPR + sum(n for name, n in loads.items() if name in self.drain_load) < demand:
            self.shortfall_steps += 1
        self.gpu_pod_s += len(self.fake.current.pods) * self.step_s
        self.oracle_pod_s += decide.replicas_for(demand, SPR) * self.step_s
        state = self.fake.state()
        horizon = decide.horizon_s(self.spec, state)
        if self.forecast == "perfect":
            ahead = np.arange(now, now + horizon + 1, self.step_s)
            peak = max(self.demand(float(t)) for t in ahead)
        else:
            peak = demand
        history = decide.DemandHistory(
            step_s=self.step_s,
            timestamps=np.asarray(self.ts),
            values=np.asarray(self.vs),
            fetched_s=now,
        )
        forecast = decide.PeakForecast(value=peak, quantile=0.95, horizon_s=horizon, computed_s=now)
        backends = {
            f"10.0.{i // 250}.{i % 250}:8000": sig.BackendSignals(
                address=f"10.0.{i // 250}.{i % 250}:8000", pod=name, state="ready", active_streams=n
            )
            for i, (name, n) in enumerate(sorted(loads.items()))
        }
        queued = max(0, round(demand) - sum(loads.values()))
        signals = decide.SignalsSnapshot(time_s=now, backends=backends, admission_queue=queued)
        plan = decide.decide(self.spec, now, history=history, forecast=forecast, signals=signals, state=state)
        self.apply(plan, now, loads, state)
        self.plans.append(plan)
        self.clock.advance(self.step_s)
        return plan

    def apply(
        self, plan: decide.Plan, now: float, loads: dict[str, int], state: cluster.ClusterState
    ) -> None:
        before = {p.name for p in self.fake.current.pods}
        for action in acting.apply_plan(self.fake, plan, state, now=now):
            if isinstance(action, acting.Drain):
                self.drain_load[action.pod] = (now, loads.get(action.pod, 0))
                self.drain_marks.append(now)
            elif isinstance(action, acting.Undrain):
                self.drain_load.pop(action.pod, None)
        gone = before - {p.name for p in self.fake.current.pods}
        assert gone == set(plan.remove), f"ReplicaSet removed {gone}, plan said {plan.remove}"
        self.removed_with_streams += sum(1 for pod in gone if loads.get(pod, 0) > 0)

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds // self.step_s)):
            self.step()

    @property
    def replicas(self) -> int:
        return self.fake.current.spec_replicas


def _max_marks_per_minute(marks: list[float]) -> int:
    return max((sum(1 for m in marks if t <= m < t + 60) for t in marks), default=0)


def test_ramp_with_a_perfect_forecast_has_capacity_ready_in_time() -> None:
    def ramp(t: float) -> float:
        return min(200.0, max(0.0, (t - 1_700_000_000.0 - 1800) / 36))  # 0 -> 200 streams over 2 h

    ahead = World(make_spec(), ramp)
    ahead.run(4 * 3600)
    assert ahead.shortfall_steps == 0
    assert ahead.replicas == 20
    reactive = World(make_spec(), ramp, forecast="none")
    reactive.run(4 * 3600)
    assert reactive.shortfall_steps > 60  # without a forecast every pod arrives a lead time late


def test_spike_shorter_than_lead_time_is_met_reactively_and_released_slowly() -> None:
    t0 = 1_700_000_000.0

    def spike(t: float) -> float:
        return 95.0 if t0 + 3600 <= t < t0 + 3600 + 240 else 15.0

    world = World(make_spec(), spike, replicas=2, forecast="none")
    world.run(3600)
    assert world.replicas == 2 and not any(p.drain for p in world.plans)
    world.step()
    assert world.replicas == 10 and "ReactiveFloor" in [r.code for r in world.plans[-1].reasons]
    world.run(240 + 540)  # spike over, window not yet passed
    assert world.replicas == 10 and not any(p.drain for p in world.plans)
    world.run(3600)
    assert world.replicas == 2
    assert world.removed_with_streams == 0
    assert _max_marks_per_minute(world.drain_marks) <= 1


def test_drop_drains_one_pod_per_minute_after_the_window_and_never_cuts_streams() -> None:
    t0 = 1_700_000_000.0
    spec = make_spec(
        scaleDown={"stabilizationWindowSeconds": 600, "maxPodsPerMinute": 2, "drainTimeoutSeconds": 300}
    )

    def drop(t: float) -> float:
        return 100.0 if t < t0 + 1800 else 10.0

    world = World(spec, drop, replicas=10, step_s=15.0)
    world.run(1800 + 600 - 15)
    assert world.replicas == 10 and not world.drain_marks
    world.run(1800)
    assert world.replicas == 1
    assert world.drain_marks[0] >= t0 + 1800 + 600 - 15
    assert _max_marks_per_minute(world.drain_marks) == 2
    assert world.removed_with_streams == 0
    assert world.shortfall_steps == 0


def test_weekly_cycle_follows_demand_within_a_margin_of_the_oracle() -> None:
    t0 = 1_700_000_000.0

    def weekly(t: float) -> float:
        day = (t - t0) / 86400
        weekend = 0.4 if int(day) % 7 in (5, 6) else 1.0
        return 10 + 140 * weekend * max(0.0, math.sin(math.pi * (day % 1))) ** 2

    world = World(make_spec(replicas={"min": 1, "max": 30}), weekly, step_s=120.0, replicas=2)
    world.run(7 * 86400)
    assert world.shortfall_steps == 0
    assert world.removed_with_streams == 0
    replicas = [p.desired_replicas for p in world.plans]
    per_day = [replicas[i : i + 720] for i in range(0, len(replicas), 720)]
    assert max(per_day[2]) == 15 and min(per_day[2]) <= 3  # weekday: peak 150 streams, trough 10
    assert max(per_day[5]) == 7  # weekend peak 66 streams
    # Held ahead by a lead time and released after the window: more than the oracle, but not much more.
    assert 1.0 < world.gpu_pod_s / world.oracle_pod_s < 1.1


def test_demand_coming_back_during_a_drain_undrains_before_adding_pods() -> None:
    t0 = 1_700_000_000.0

    def dip(t: float) -> float:
        return 5.0 if t0 + 1200 <= t < t0 + 1290 else 55.0

    world = World(
        make_spec(
            scaleDown={"stabilizationWindowSeconds": 60, "maxPodsPerMinute": 3, "drainTimeoutSeconds": 60}
        ),
        dip,
        replicas=6,
        step_s=15.0,
        forecast="none",
    )
    world.run(1290)
    assert world.drain_marks  # the dip started a drain
    created_before = {p.name for p in world.fake.current.pods}
    world.step()
    plan = world.plans[-1]
    assert plan.undrain and "Undrain" in [r.code for r in plan.reasons]
    added = {p.name for p in world.fake.current.pods} - created_before
    assert len(added) == plan.desired_replicas - len(created_before)
    assert world.removed_with_streams == 0
