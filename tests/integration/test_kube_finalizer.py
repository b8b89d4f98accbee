"""Nothing leaks: what a policy made or marked goes with it (finalizer), or with its owner (garbage collection).

Regression for the issue "objects leak": deleting a policy, or switching its provisioner, left placeholder
pods pinning GPU nodes, CapacityBuffers holding capacity, drain annotations starving pods and do-not-disrupt
annotations blocking consolidation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from controller import cluster, policy
from controller.kube import cluster as kube_cluster
from controller.kube import finalizing, provisioners
from tests.fakes import kube_api
from tests.integration.test_loop_resilience import NS, Env, make_env

__all__ = ["make_env"]

OURS = (cluster.DRAIN_ANNOTATION, cluster.DO_NOT_DISRUPT_ANNOTATION, cluster.DELETION_COST_ANNOTATION)


def stored_policy(env: Env, name: str) -> dict[str, Any] | None:
    return env.api.get("forestall.dev", "scalingpolicies", NS, name)


async def setup(env: Env, **spec: Any) -> kube_cluster.KubeCluster:
    """Policy `w` on a 2-pod Deployment, reconciled once (finalizer on); placeholders held, pods marked."""
    env.ready_pods("w", 2)
    env.api.put(kube_api.scaling_policy("w", NS, **spec))
    env.demand.level["w"] = 15.0
    await env.controller.start()
    await env.settle()
    await env.controller.reconcile_all()
    obj = stored_policy(env, "w")
    assert obj is not None and finalizing.has_finalizer(obj)
    await env.settle()
    kc = kube_cluster.KubeCluster(
        policy.parse({k: v for k, v in obj.items() if k != "status"}),
        api_client=env.client,
        caches=env.controller.caches,
        clock=env.clock,
    )
    pods = sorted(p["metadata"]["name"] for p in env.api.objects("", "pods", NS))
    await asyncio.to_thread(kc.annotate, pods[0], {OURS[0]: "1800000000", OURS[1]: "true", OURS[2]: "-100"})
    # someone else's deletion cost on the other pod: never ours to remove
    other = env.api.get("", "pods", NS, pods[1])
    assert other is not None
    other["metadata"].setdefault("annotations", {})[OURS[2]] = "7"
    env.api.put(other)
    await env.settle()
    return kc


def ours_left(env: Env) -> list[str]:
    left = []
    for pod in env.api.objects("", "pods", NS):
        if provisioners.POLICY_LABEL in pod["metadata"].get("labels", {}):
            left.append(f"pod {pod['metadata']['name']}")
        annotations = pod["metadata"].get("annotations") or {}
        left += [
            f"{pod['metadata']['name']} {k}"
            for k in (*OURS[:2], finalizing.WROTE_ANNOTATION)
            if k in annotations
        ]
    for group, plural in (("", "podtemplates"), ("autoscaling.x-k8s.io", "capacitybuffers")):
        left += [f"{plural} {o['metadata']['name']}" for o in env.api.objects(group, plural, NS)]
    return left


async def test_a_deleted_policy_leaves_nothing_of_ours(make_env: Any) -> None:
    env = await make_env()
    kc = await setup(env, provisioner={"type": "placeholder"})
    await asyncio.to_thread(kc.provision, 2)
    holders = [
        p
        for p in env.api.objects("", "pods", NS)
        if provisioners.PLACEHOLDER_LABEL in p["metadata"]["labels"]
    ]
    assert len(holders) == 2
    uid = (stored_policy(env, "w") or {})["metadata"]["uid"]
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == uid for p in holders)
    env.api.delete("forestall.dev", "scalingpolicies", NS, "w")
    assert stored_policy(env, "w") is not None, "held by the finalizer"
    await env.settle()
    await env.controller.reconcile_all()
    assert stored_policy(env, "w") is None
    assert ours_left(env) == []
    costs = {
        p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(OURS[2])
        for p in env.api.objects("", "pods", NS)
    }
    assert sorted(costs.values(), key=lambda v: v or "") == [None, "7"], (
        "ours removed, the other controller's kept"
    )


async def test_owned_objects_are_garbage_collected_without_the_controller(make_env: Any) -> None:
    env = await make_env()
    kc = await setup(env, provisioner={"type": "capacityBuffer"})
    await asyncio.to_thread(kc.provision, 2)
    assert env.api.objects("autoscaling.x-k8s.io", "capacitybuffers", NS)
    obj = stored_policy(env, "w")
    assert obj is not None
    obj["metadata"]["finalizers"] = []  # the controller is gone: nobody runs the finalizer
    env.api.put(obj)
    env.api.delete("forestall.dev", "scalingpolicies", NS, "w")
    assert {(r, n) for r, _, n in env.api.garbage_collected} == {
        ("capacitybuffers", "w-buffer"),
        ("podtemplates", "w-buffer"),
    }


async def test_switching_provisioner_releases_the_old_ones_objects(make_env: Any) -> None:
    env = await make_env()
    kc = await setup(env, provisioner={"type": "placeholder"})
    await asyncio.to_thread(kc.provision, 2)
    env.api.put(kube_api.scaling_policy("w", NS, provisioner={"type": "capacityBuffer"}))
    await env.settle()
    await env.controller.reconcile_all()
    holders = [
        p
        for p in env.api.objects("", "pods", NS)
        if provisioners.PLACEHOLDER_LABEL in p["metadata"]["labels"]
    ]
    assert holders == []


async def test_moving_to_dry_run_releases_and_drops_the_finalizer(make_env: Any) -> None:
    env = await make_env()
    kc = await setup(env, provisioner={"type": "placeholder"})
    await asyncio.to_thread(kc.provision, 1)
    env.api.put(kube_api.scaling_policy("w", NS, provisioner={"type": "placeholder"}, mode="dryRun"))
    await env.settle()
    await env.controller.reconcile_all()
    obj = stored_policy(env, "w")
    assert obj is not None and not finalizing.has_finalizer(obj)
    assert ours_left(env) == []
