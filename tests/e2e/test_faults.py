"""Forestall's controller under the faults a real cluster throws at it, end to end on loopback.

Two controller replicas (the real `controller.loop.Controller`, `KubeCluster`, `decide()` and `LeaseElector`
through the official client) run against the in-test API server while the test injects what a real API
server does on a bad day: a 30 s outage, 503 and 429 bursts, watch 410s, the leader dying mid-scale-up, a
policy whose target is missing while its status writes fail, and a policy deleted with capacity held. Time is
a FakeClock shared by the replicas and the server, so "30 s" is fake time driven by `advance()`.

Demand is scripted (a flat level per policy), so what is tested is the controller's survival and the
absence of duplicate, lost or leaked actions, not the forecast. Not reached here: a balancer replica
terminating during scale-down with zero streams cut (the real balancer and load generator run in
`test_system.py`; the endpoint selection that keeps a terminating-but-serving replica's signals is tested in
`tests/integration/test_kube_cluster.py`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from contract import clock as clock_mod
from controller import cluster, decide, loop, metrics, policy
from controller.kube import api as kube_api_mod
from controller.kube import cluster as kube_cluster
from controller.kube import finalizing, lease, provisioners
from tests.fakes import kube_api
from tests.fakes.kube_api import FakeKubeApi, advance_until, eventually
from tests.integration.test_loop_resilience import Level

NS = "llm"
LEASE = {"lease_duration_s": 6.0, "renew_deadline_s": 4.0, "retry_period_s": 1.0}
INTERVAL_S = 5.0


@dataclass
class Replica:
    name: str
    controller: loop.Controller
    elector: lease.LeaseElector
    client: Any
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class System:
    def __init__(self, api: FakeKubeApi, clock: clock_mod.FakeClock) -> None:
        self.api, self.clock = api, clock
        self.demand = Level()
        self.replicas: dict[str, Replica] = {}
        self.decide_gate: dict[str, Any] = {}

    def replica(self, name: str, **controller: Any) -> Replica:
        client = kube_api_mod.client_for(self.api.url)
        elector = lease.LeaseElector(
            client, name="forestall-controller", namespace=NS, identity=name, clock=self.clock, **LEASE
        )
        ctl = loop.Controller(
            client,
            demand=self.demand,
            forecasts=self.demand.forecaster,
            clock=self.clock,
            controller_metrics=metrics.ControllerMetrics(CollectorRegistry()),
            namespace=NS,
            identity=name,
            elector=elector,
            interval_s=INTERVAL_S,
            **controller,
        )
        rep = Replica(name, ctl, elector, client)
        self.replicas[name] = rep
        rep.task = asyncio.create_task(ctl.run(rep.stop))
        return rep

    def holder(self) -> str | None:
        obj = self.api.get("coordination.k8s.io", "leases", NS, "forestall-controller")
        return None if obj is None else obj["spec"].get("holderIdentity")

    def replicas_of(self, name: str) -> int:
        obj = self.api.get("apps", "deployments", NS, name)
        assert obj is not None
        return int(obj["spec"]["replicas"])

    def ready_pods(self, name: str, count: int) -> None:
        self.api.put(kube_api.deployment(name, NS, replicas=count))
        self.api.run_workloads()
        for pod in self.api.objects("", "pods", NS):
            if pod["metadata"]["labels"].get("app") == name:
                self.api.set_pod_state(NS, pod["metadata"]["name"], node="gpu-a", running=True, ready=True)

    def alive(self) -> bool:
        return all(
            r.task is not None and not r.task.done() for r in self.replicas.values() if not r.stop.is_set()
        )


@pytest.fixture
async def system() -> AsyncIterator[System]:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.1) as api:
        sys_ = System(api, clock)
        try:
            yield sys_
        finally:
            api.release_hangs()
            for rep in sys_.replicas.values():
                rep.stop.set()
            await asyncio.gather(
                *(r.task for r in sys_.replicas.values() if r.task is not None), return_exceptions=True
            )
            for rep in sys_.replicas.values():
                rep.client.close()


async def leading(sys_: System) -> Replica:
    await advance_until(sys_.clock, lambda: sys_.holder() in sys_.replicas, "a leader", step_s=1.0)
    return sys_.replicas[str(sys_.holder())]


async def test_a_30_s_api_outage_is_survived_and_work_resumes(system: System) -> None:
    system.ready_pods("chat", 2)
    system.api.put(kube_api.scaling_policy("chat", NS))
    system.demand.level["chat"] = 15.0
    system.replica("a")
    system.replica("b")
    leader = await leading(system)
    await advance_until(system.clock, lambda: leader.controller.cycles >= 1, "a first cycle", step_s=1.0)
    async with system.api.outage():
        for _ in range(30):
            system.clock.advance(1.0)
            await asyncio.sleep(0.02)
        assert system.alive(), "no replica exits during the outage"
        assert not any(r.elector.is_leader for r in system.replicas.values()), "nobody acts blind"
        assert all(r.controller.liveness_problems() == [] for r in system.replicas.values())
    system.demand.level["chat"] = 45.0
    await advance_until(
        system.clock, lambda: system.replicas_of("chat") == 5, "scaled after the outage", step_s=1.0
    )
    assert system.alive()
    assert len(system.api.calls("update", "deployments", "scale")) == 1, "one scale, no duplicate"


async def test_503_and_429_bursts_and_watch_410s_are_survived(system: System) -> None:
    system.ready_pods("chat", 2)
    system.api.put(kube_api.scaling_policy("chat", NS))
    system.demand.level["chat"] = 15.0
    system.replica("a")
    await leading(system)
    system.api.inject_error("*", r"/apis/", 503, times=40)
    system.api.inject_error("*", r"/api/v1/", 429, times=40, retry_after_s=2)
    for _ in range(20):
        system.clock.advance(1.0)
        await asyncio.sleep(0.05)
    assert system.alive()
    system.api.compact()  # every watch now resumes from a version the server no longer has: 410, relist
    system.api.end_watches()
    system.demand.level["chat"] = 45.0
    system.api.put(
        kube_api.scaling_policy("chat", NS, replicas={"min": 1, "max": 4})
    )  # seen after the relist
    await advance_until(
        system.clock, lambda: system.replicas_of("chat") == 4, "the new max applied", step_s=1.0
    )
    assert system.alive()


async def test_the_leader_killed_mid_scale_up_is_replaced_with_no_duplicate_or_lost_action(
    system: System,
) -> None:
    system.ready_pods("chat", 2)
    system.api.put(kube_api.scaling_policy("chat", NS))
    system.demand.level["chat"] = 15.0
    entered, gate = threading.Event(), threading.Event()
    killed: set[str] = set()

    def stalling(name: str) -> Any:
        def decide_fn(*args: Any, **inputs: Any) -> decide.Plan:
            if name in killed or (system.demand.level["chat"] > 20 and name == "a"):
                entered.set()
                gate.wait(30)
                raise RuntimeError("the process is dead")  # never acts: killed mid-scale-up
            return decide.decide(*args, **inputs)

        return decide_fn

    a = system.replica("a", decide_fn=stalling("a"))
    await advance_until(system.clock, lambda: system.holder() == "a", "a leads", step_s=1.0)
    b = system.replica("b", decide_fn=stalling("b"))
    system.demand.level["chat"] = 45.0
    await advance_until(system.clock, entered.is_set, "a is mid-scale-up", step_s=1.0)
    # kill -9: no release, no more renewals; the stalled reconcile never acts
    killed.add("a")
    a.elector.release = lambda: None  # type: ignore[method-assign]
    a.elector.try_acquire_or_renew = lambda: (_ for _ in ()).throw(OSError("dead"))  # type: ignore[method-assign]
    a.stop.set()
    killed_at = system.clock.monotonic()
    await advance_until(system.clock, lambda: system.holder() == "b", "b takes over", step_s=1.0)
    assert system.clock.monotonic() - killed_at <= LEASE["lease_duration_s"] + 2 * LEASE["retry_period_s"]
    await advance_until(system.clock, lambda: system.replicas_of("chat") == 5, "b scales up", step_s=1.0)
    gate.set()
    assert [c.status for c in system.api.calls("update", "deployments", "scale")] == [200], (
        "exactly one scale"
    )
    assert b.controller.liveness_problems() == []


async def test_a_missing_target_with_failing_status_writes_leaves_the_process_alive(system: System) -> None:
    system.ready_pods("fine", 1)
    system.api.put(kube_api.scaling_policy("ghost", NS))
    system.api.put(kube_api.scaling_policy("fine", NS))
    system.demand.level.update(fine=35.0)
    system.api.inject_error("PATCH", r"/scalingpolicies/ghost/status$", 500, times=10_000)
    rep = system.replica("a")
    await leading(system)
    await advance_until(
        system.clock, lambda: system.replicas_of("fine") == 4, "the healthy policy acts", step_s=1.0
    )
    for _ in range(3 * int(INTERVAL_S)):
        system.clock.advance(1.0)
        await asyncio.sleep(0.02)
    assert rep.task is not None and not rep.task.done()


async def test_a_deleted_policy_leaves_nothing_of_ours(system: System) -> None:
    system.ready_pods("chat", 2)
    system.api.put(
        kube_api.scaling_policy(
            "chat",
            NS,
            provisioner={"type": "placeholder"},
            leadTime={"nodeProvisioningSeconds": 600, "podStartSeconds": 30, "modelLoadSeconds": 30},
        )
    )
    system.api.put(
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": "forestall-placeholder"},
            "value": -10,
            "preemptionPolicy": "Never",
        }
    )
    system.demand.level["chat"] = 15.0
    system.replica("a")
    await leading(system)
    await advance_until(
        system.clock,
        lambda: finalizing.has_finalizer(
            system.api.get("forestall.dev", "scalingpolicies", NS, "chat") or {}
        ),
        "the finalizer is on",
        step_s=1.0,
    )
    # capacity held and pods marked, as a scale-up ahead of a peak and a scale-down leave them
    stored = system.api.get("forestall.dev", "scalingpolicies", NS, "chat")
    assert stored is not None
    leader = system.replicas[str(system.holder())].controller
    kc = kube_cluster.KubeCluster(
        policy.parse({k: v for k, v in stored.items() if k != "status"}),
        api_client=leader.api_client,
        caches=leader.caches,
        clock=system.clock,
    )
    await asyncio.to_thread(kc.provision, 2)
    pod = sorted(p["metadata"]["name"] for p in system.api.objects("", "pods", NS))[0]
    await eventually(lambda: leader.caches.pods.get(NS, pod) is not None, "pod cached")
    await asyncio.to_thread(kc.annotate, pod, {cluster.DRAIN_ANNOTATION: "1800000000"})
    held = [
        p
        for p in system.api.objects("", "pods", NS)
        if provisioners.PLACEHOLDER_LABEL in p["metadata"]["labels"]
    ]
    assert len(held) == 2
    system.api.delete("forestall.dev", "scalingpolicies", NS, "chat")
    await advance_until(
        system.clock,
        lambda: system.api.get("forestall.dev", "scalingpolicies", NS, "chat") is None,
        "the policy is gone",
        step_s=1.0,
    )
    for pod in system.api.objects("", "pods", NS):
        assert provisioners.POLICY_LABEL not in pod["metadata"].get("labels", {})
        annotations = pod["metadata"].get("annotations") or {}
        assert not {finalizing.WROTE_ANNOTATION, *finalizing.OWNED_KEYS[:2]} & set(annotations)
    assert system.api.objects("", "podtemplates", NS) == []
