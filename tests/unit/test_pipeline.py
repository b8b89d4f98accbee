"""`controller.pipeline.PolicyPipeline`: the one reconcile the Kubernetes loop, the demo and the simulator run.

A scripted scenario (demand rising then falling, pods started by hand) is driven through the pipeline with a
`FakeCluster` the way the Kubernetes loop drives it (on an event loop, blocking steps on threads) and the way
the simulator drives it (`run_inline`, no event loop): the plans and the actions must be the same. The
simulator's Forestall runner must reconcile through it too (it used to apply plans with its own copy).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

from contract import clock as clock_mod
from contract import signals as sig
from controller import acting, cluster, decide, pipeline, policy
from emulation import runners, sim, simulate, streams
from tests.fakes.cluster import FakeCluster

NOW = 1_700_000_000.0
STEP_S = 60.0


def make_policy(**over: Any) -> policy.ScalingPolicy:
    spec: dict[str, Any] = {
        "scaleTargetRef": {"kind": "Deployment", "name": "worker"},
        "demand": {"balancer": {"service": "balancer"}, "staleAfterSeconds": 120},
        "capacity": {"streamsPerReplica": 10},
        "replicas": {"min": 1, "max": 20},
        "forecast": {"stepSeconds": STEP_S, "historySeconds": 3600, "model": "recentMax"},
        "scaleDown": {"stabilizationWindowSeconds": 120, "maxPodsPerMinute": 2, "drainTimeoutSeconds": 120},
    }
    spec.update(over)
    return policy.ScalingPolicy.model_validate(
        {"metadata": {"name": "chat", "namespace": "llm"}, "spec": spec}
    )


def level_at(t: float) -> float:
    """Demand of the scripted scenario: 20 streams, up to 55 after 10 minutes, down to 5 after 25."""
    minutes = (t - NOW) / 60.0
    return 20.0 if minutes < 10 else 55.0 if minutes < 25 else 5.0


class ScriptedDemand:
    """History of the scripted demand (one sample per step up to now) and signals spreading it over Ready pods."""

    def __init__(self, fake: FakeCluster) -> None:
        self.fake = fake
        self.fail_next = False

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("Prometheus went away")
        stamps = np.arange(NOW - 1800.0, now + 1e-9, STEP_S)
        values = np.asarray([level_at(float(t)) for t in stamps])
        history = decide.DemandHistory(step_s=STEP_S, timestamps=stamps, values=values, fetched_s=now)
        ready = [p.name for p in self.fake.current.pods if p.phase == "ready" and p.drain_started_s is None]
        demand = int(level_at(now))
        per = (
            [demand // len(ready) + (1 if i < demand % len(ready) else 0) for i in range(len(ready))]
            if ready
            else []
        )
        backends = {
            f"10.0.0.{i}:8000": sig.BackendSignals(
                address=f"10.0.0.{i}:8000", pod=name, state="ready", active_streams=n
            )
            for i, (name, n) in enumerate(zip(ready, per, strict=True))
        }
        queue = demand - sum(per)
        return pipeline.DemandReading(
            history, decide.SignalsSnapshot(time_s=now, backends=backends, admission_queue=queue)
        )


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[pipeline.Outcome] = []

    def report(self, outcome: pipeline.Outcome) -> None:
        self.outcomes.append(outcome)


def start_state() -> cluster.ClusterState:
    pods = tuple(
        cluster.PodState(name=f"w{i}", phase="ready", created_s=NOW - 3600, ready_s=NOW - 3000, node="n0")
        for i in range(2)
    )
    return cluster.ClusterState(spec_replicas=2, pods=pods)


def scenario(drive: str) -> list[tuple[decide.Plan, tuple[acting.Action, ...]]]:
    """40 reconciles a minute apart; new pods turn Ready one reconcile after they appear."""
    clock = clock_mod.FakeClock(start=NOW)
    fake = FakeCluster(start_state(), now_s=NOW)
    recorder = Recorder()
    pipe = pipeline.PolicyPipeline(
        make_policy(),
        cluster=fake,
        demand=ScriptedDemand(fake),
        reporter=recorder,
        clock=clock,
        offload=asyncio.to_thread if drive == "kube" else pipeline.inline,
    )

    async def as_the_loop() -> None:
        for _ in range(40):
            await pipe.reconcile()
            step()

    def step() -> None:
        for p in fake.current.pods:
            if p.phase == "pending":
                fake.set_phase(p.name, "ready", at_s=clock.now())
        clock.advance(STEP_S)
        fake.now_s = clock.now()

    if drive == "kube":
        asyncio.run(as_the_loop())
    else:
        for _ in range(40):
            pipeline.run_inline(pipe.reconcile())
            step()
    return [(o.plan, o.actions) for o in recorder.outcomes]


def test_the_loop_and_the_simulator_drive_the_same_reconcile() -> None:
    """The Kubernetes loop's way (event loop, threads) and the simulator's (inline) give the same plans."""
    kube, simulated = scenario("kube"), scenario("sim")
    assert [p for p, _ in kube] == [p for p, _ in simulated]
    assert [a for _, a in kube] == [a for _, a in simulated]
    kinds = {type(a) for _, actions in kube for a in actions}
    assert {acting.Scale, acting.Drain, acting.DoNotDisrupt} <= kinds, kinds
    assert max(p.desired_replicas for p, _ in kube) >= 6  # 55 streams at 10 each
    assert any(p.forecast is not None for p, _ in kube)


def test_a_failing_demand_source_is_missing_data_not_a_failed_reconcile() -> None:
    fake = FakeCluster(start_state(), now_s=NOW)
    source = ScriptedDemand(fake)
    source.fail_next = True
    recorder = Recorder()
    pipe = pipeline.PolicyPipeline(
        make_policy(), cluster=fake, demand=source, reporter=recorder, clock=clock_mod.FakeClock(start=NOW)
    )
    outcome = pipeline.run_inline(pipe.reconcile())
    assert not outcome.plan.demand_data_available and outcome.plan.desired_replicas == 2
    assert outcome.plan.reasons[0].code == decide.ReasonCode.HISTORY_MISSING
    assert any("Prometheus went away" in e for e in outcome.demand_errors)
    assert recorder.outcomes == [outcome]


def test_dry_run_reports_and_touches_nothing() -> None:
    fake = FakeCluster(start_state(), now_s=NOW)
    recorder = Recorder()
    clock = clock_mod.FakeClock(start=NOW + 600)  # demand is 55: a real run would scale up
    pipe = pipeline.PolicyPipeline(
        make_policy(mode="dryRun"), cluster=fake, demand=ScriptedDemand(fake), reporter=recorder, clock=clock
    )
    outcome = pipeline.run_inline(pipe.reconcile())
    assert outcome.dry_run and outcome.actions == () and not outcome.scaled
    assert outcome.plan.desired_replicas > 2
    assert [name for name, _ in fake.calls] == ["state"]
    assert recorder.outcomes == [outcome]


def test_the_forecaster_is_kept_until_the_forecast_settings_change() -> None:
    fake = FakeCluster(start_state(), now_s=NOW)
    pipe = pipeline.PolicyPipeline(
        make_policy(), cluster=fake, demand=ScriptedDemand(fake), reporter=Recorder(), clock=clock_mod.SYSTEM
    )
    first = pipe.forecast_
    pipe.update_policy(make_policy(replicas={"min": 2, "max": 30}), cluster=fake)
    assert pipe.forecast_ is first
    changed = make_policy(forecast={"stepSeconds": STEP_S, "historySeconds": 3600, "model": "gbm"})
    pipe.update_policy(changed, cluster=fake)
    assert pipe.forecast_ is not first and pipe.forecast_.settings.model == "gbm"


def test_run_inline_refuses_a_seam_that_suspends() -> None:
    async def suspends() -> int:
        await asyncio.sleep(0)
        return 1

    with pytest.raises(RuntimeError, match="suspended"):
        pipeline.run_inline(suspends())


def test_the_simulator_reconciles_through_the_pipeline() -> None:
    """Regression: `forestall simulate` had its own apply (no do-not-disrupt marks, a second apply_plan)."""
    spec = simulate.default_spec()
    c = sim.SimCluster(spec, seed=0, start_s=NOW, node_release_after_s=30.0)
    c.bootstrap(3)
    book = streams.StreamBook(slo_s=2.0, rng=random.Random(0))
    runner = runners.ForestallRunner("forestall", spec, c, book, start_s=NOW, end_s=NOW + 3600)
    assert isinstance(runner.pipeline, pipeline.PolicyPipeline) and runner.pipeline.cluster is c
    runner.reconcile(NOW + 15, 30.0)
    last = runner.pipeline.last_
    assert last is not None and last.plan is runner.last_plan and not last.dry_run
    # Pods carrying streams get karpenter.sh/do-not-disrupt, which only apply_plan writes.
    book.act_end = np.full(30, NOW + 600.0)
    book.act_pod = np.asarray([i % 3 for i in range(30)], dtype=np.int64)
    runner.reconcile(NOW + 30, 30.0)
    marked = [
        p.name for p in c.pods.values() if p.annotations.get(cluster.DO_NOT_DISRUPT_ANNOTATION) == "true"
    ]
    assert marked == ["worker-0", "worker-1", "worker-2"]
    assert any(isinstance(a, acting.DoNotDisrupt) for a in runner.pipeline.last_.actions)  # type: ignore[union-attr]
