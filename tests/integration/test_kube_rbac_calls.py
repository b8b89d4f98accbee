"""Every API call the controller makes is granted by the manifests' RBAC: least privilege, checked from calls.

One run of the real controller against the in-test API server exercises every kind of call it makes (watch
caches, status, Events, scale, pod annotations, every provisioner, leader election); the server records each
request, and `FakeKubeApi.rbac_rules()` turns them into `(apiGroup, resource[/subresource], verb)`. Each of
those must be granted by `manifests/base/rbac-controller.yaml` plus the cluster-autoscaler overlay's rules.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from contract import clock as clock_mod
from controller import loop, metrics
from controller.kube import api as kube_api_mod
from controller.kube import lease
from tests.conftest import ROOT
from tests.fakes import kube_api
from tests.fakes.kube_api import FakeKubeApi, advance_until
from tests.integration.test_loop_controller import ScriptedDemand

NS = "llm"
RBAC_FILES = (
    ROOT / "manifests" / "base" / "rbac-controller.yaml",
    ROOT / "manifests" / "overlays" / "cluster-autoscaler" / "rbac-cluster-autoscaler.yaml",
)

CORE_CALLS = {
    ("forestall.dev", "scalingpolicies", "list"),
    ("forestall.dev", "scalingpolicies", "watch"),
    ("forestall.dev", "scalingpolicies/status", "patch"),
    ("apps", "deployments", "list"),
    ("apps", "deployments", "watch"),
    ("apps", "deployments/scale", "get"),
    ("apps", "deployments/scale", "update"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods", "patch"),
    ("", "pods", "create"),
    ("", "pods", "delete"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("autoscaling", "horizontalpodautoscalers", "list"),
    ("autoscaling", "horizontalpodautoscalers", "watch"),
    ("scheduling.k8s.io", "priorityclasses", "get"),
    ("events.k8s.io", "events", "create"),
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
    ("autoscaling.x-k8s.io", "capacitybuffers", "get"),
    ("autoscaling.x-k8s.io", "capacitybuffers", "create"),
    ("autoscaling.x-k8s.io", "provisioningrequests", "list"),
    ("autoscaling.x-k8s.io", "provisioningrequests", "create"),
    ("", "podtemplates", "get"),
    ("", "podtemplates", "create"),
    # the finalizer: added while active, and its cleanup when the policies are deleted
    ("forestall.dev", "scalingpolicies", "patch"),
    ("autoscaling.x-k8s.io", "capacitybuffers", "list"),
    ("autoscaling.x-k8s.io", "capacitybuffers", "delete"),
    ("autoscaling.x-k8s.io", "provisioningrequests", "delete"),
    ("", "podtemplates", "list"),
    ("", "podtemplates", "delete"),
}
"""Calls this scenario must make: if one disappears, the scenario no longer covers that path."""


def granted() -> set[tuple[str, str, str]]:
    rules: set[tuple[str, str, str]] = set()
    for path in RBAC_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("ClusterRole", "Role"):
                continue
            for rule in doc.get("rules", []):
                for group in rule.get("apiGroups", []):
                    for resource in rule.get("resources", []):
                        for verb in rule.get("verbs", []):
                            rules.add((group, resource, verb))
    return rules


async def test_every_call_the_controller_makes_is_granted_by_the_manifests() -> None:
    if not all(p.exists() for p in RBAC_FILES):
        pytest.skip(f"RBAC manifests not present: {[str(p) for p in RBAC_FILES if not p.exists()]}")
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.1) as api:
        api.put(  # shipped by manifests/base/priorityclass.yaml
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": "forestall-placeholder"},
                "value": -10,
                "preemptionPolicy": "Never",
            }
        )
        provisioners: dict[str, dict[str, Any]] = {
            "plain": {},
            "buffer": {"provisioner": {"type": "capacityBuffer"}},
            "holder": {"provisioner": {"type": "placeholder"}},
            "request": {"provisioner": {"type": "provisioningRequest"}},
        }
        for name, spec in provisioners.items():
            api.put(kube_api.deployment(name, NS, replicas=1))
            api.put(
                kube_api.scaling_policy(
                    name,
                    NS,
                    demand={"balancer": {"service": "balancer"}, "prometheus": {"query": "sum(streams)"}},
                    leadTime={"nodeProvisioningSeconds": 600, "podStartSeconds": 30, "modelLoadSeconds": 30},
                    **spec,
                )
            )
        api.run_workloads()
        pods = sorted(p["metadata"]["name"] for p in api.objects("", "pods", NS))
        for pod in pods:
            api.set_pod_state(NS, pod, node="gpu-a", running=True, ready=True)
        client = kube_api_mod.client_for(api.url)
        demand = ScriptedDemand(clock)
        demand.streams = dict.fromkeys(pods, 4)
        for name in provisioners:
            demand.level[name] = 25.0
            demand.forecast[name] = 60.0  # a peak beyond the pod horizon: GPUs held through the provisioner
        elector = lease.LeaseElector(
            client, name="forestall-controller", namespace=NS, identity="rbac", clock=clock,
            lease_duration_s=6.0, renew_deadline_s=4.0, retry_period_s=1.0,
        )  # fmt: skip
        controller = loop.Controller(
            client,
            demand=demand,
            clock=clock,
            controller_metrics=metrics.ControllerMetrics(CollectorRegistry()),
            identity="rbac",
            elector=elector,
            forecasts=demand.forecaster,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            await advance_until(clock, lambda: controller.cycles >= 1, "a first cycle as leader", step_s=1.0)
            # demand falls away: placeholders are deleted, buffers and requests shrink
            for name in provisioners:
                demand.level[name] = demand.forecast[name] = 0.0
            cycles = controller.cycles
            # steps of one retry period: a jump past the renew deadline (4 s) is a stalled leader, which
            # steps down until its next renewal
            await advance_until(clock, lambda: controller.cycles > cycles, "a second cycle", step_s=1.0)
            for name in provisioners:  # deleted policies: the finalizer releases what they held
                api.delete("forestall.dev", "scalingpolicies", NS, name)
            await advance_until(
                clock,
                lambda: not api.objects("forestall.dev", "scalingpolicies", NS),
                "every policy cleaned up and gone",
                step_s=1.0,
            )
        finally:
            stop.set()
            await task
            client.close()
        recorded = api.rbac_rules()
        assert api.rejected == []
    assert CORE_CALLS <= recorded, sorted(CORE_CALLS - recorded)
    assert recorded <= granted(), f"calls not granted by the manifests: {sorted(recorded - granted())}"
