"""Kinds as they behave: ProvisioningRequests (ordering, renewal, binding, classes) and other autoscalers.

Regressions for the issue: requests were ordered by the opaque resourceVersion, renewed create-before-delete
(a second booking), never bound to the worker pods, `check-capacity` counted as held, provider classes
refused; and a target also scaled by an HPA or KEDA was fought over.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from contract import clock as clock_mod
from controller import errors
from controller.kube import provisioners
from tests.fakes import kube_api
from tests.integration.test_kube_cluster import NS, Env, env
from tests.integration.test_loop_resilience import make_env

__all__ = ["env", "make_env"]
GROUP = "autoscaling.x-k8s.io"
PR = {"type": "provisioningRequest", "provisioningRequest": {"bookingSeconds": 600}}


def request(name: str, count: int, created: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "ProvisioningRequest",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {provisioners.POLICY_LABEL: "w"},
            "creationTimestamp": created,
        },
        "spec": {
            "provisioningClassName": "best-effort-atomic-scale-up.autoscaling.x-k8s.io",
            "podSets": [{"podTemplateRef": {"name": "w-provreq"}, "count": count}],
        },
    }


def provisioned(obj: dict[str, Any], at: float) -> dict[str, Any]:
    obj["status"] = {
        "conditions": [
            {
                "type": "Provisioned",
                "status": "True",
                "reason": "Provisioned",
                "message": "",
                "lastTransitionTime": clock_mod.utc_iso(at),
            }
        ]
    }
    return obj


async def test_the_newest_request_by_creation_time_is_the_current_one(env: Env) -> None:
    env.api.put(request("w-newer", 2, "2027-01-15T08:05:00Z"))  # stored first: the lower resourceVersion
    env.api.put(request("w-older", 2, "2027-01-15T08:00:00Z"))
    kc = env.cluster(provisioner=PR)
    await env.call(kc.provision, 2)
    names = [r["metadata"]["name"] for r in env.api.objects(GROUP, "provisioningrequests", NS)]
    assert names == ["w-newer"]


async def test_renewal_deletes_the_old_request_before_creating_the_new(env: Env) -> None:
    kc = env.cluster(provisioner=PR)
    await env.call(kc.provision, 2)
    [first] = env.api.objects(GROUP, "provisioningrequests", NS)
    env.api.put(provisioned(first, env.clock.now()))
    env.clock.advance(600 - provisioners.RENEW_MARGIN_S + 1)
    start = len(env.api.recorded_calls)
    await env.call(kc.provision, 2)
    writes = [
        (c.verb, c.name)
        for c in env.api.recorded_calls[start:]
        if c.resource == "provisioningrequests" and c.verb in ("create", "delete")
    ]
    assert writes == [("delete", first["metadata"]["name"]), ("create", None)]


async def test_pending_worker_pods_are_bound_to_the_request(env: Env) -> None:
    kc = env.cluster(provisioner=PR)
    await env.call(kc.provision, 2)
    [current] = env.api.objects(GROUP, "provisioningrequests", NS)
    workers = [p for p in env.api.objects("", "pods", NS) if p["metadata"]["labels"].get("app") == "w"]
    assert workers and all(
        p["metadata"]["annotations"][provisioners.CONSUME_ANNOTATION] == current["metadata"]["name"]
        for p in workers
    )


async def test_check_capacity_never_counts_as_held(env: Env) -> None:
    kc = env.cluster(
        provisioner={
            "type": "provisioningRequest",
            "provisioningRequest": {"provisioningClassName": "check-capacity.autoscaling.x-k8s.io"},
        }
    )
    await env.call(kc.provision, 2)
    [checked] = env.api.objects(GROUP, "provisioningrequests", NS)
    env.api.put(provisioned(checked, env.clock.now()))
    state = await env.call(kc.state)
    assert state.provisioned_gpus == 0


async def test_provider_classes_are_passed_through(env: Env) -> None:
    kc = env.cluster(
        provisioner={
            "type": "provisioningRequest",
            "provisioningRequest": {"provisioningClassName": "queued-provisioning.gke.io"},
        }
    )
    await env.call(kc.provision, 1)
    [queued] = env.api.objects(GROUP, "provisioningrequests", NS)
    assert queued["spec"]["provisioningClassName"] == "queued-provisioning.gke.io"


def hpa(name: str, target: str, *, keda: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if keda:
        meta["ownerReferences"] = [
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "ScaledObject",
                "name": keda,
                "uid": "u-1",
                "controller": True,
            }
        ]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1,
            "maxReplicas": 5,
        },
    }


@pytest.mark.parametrize(
    ("keda", "named"), [(None, "HorizontalPodAutoscaler chat-hpa"), ("chat", "KEDA ScaledObject chat")]
)
async def test_a_target_scaled_by_an_hpa_or_keda_gets_a_condition_and_is_left_alone(
    make_env: Any, keda: str | None, named: str
) -> None:
    env = await make_env()
    env.ready_pods("chat", 2)
    env.api.put(kube_api.scaling_policy("chat", NS))
    env.api.put(hpa("keda-hpa-chat" if keda else "chat-hpa", "chat", keda=keda))
    env.demand.level["chat"] = 45.0
    await env.controller.start()
    await env.settle()
    await env.controller.reconcile_all()
    assert env.replicas("chat") == 2, "not fought over"
    obj = env.api.get("forestall.dev", "scalingpolicies", NS, "chat")
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ScaledByOther")
    assert named in ready["message"]
    with pytest.raises(errors.Refused):
        await asyncio.to_thread(env.controller._state[(NS, "chat")].pipeline.cluster.state)  # type: ignore[union-attr]


async def test_a_statefulset_target_reports_highest_ordinal_removal(env: Env) -> None:
    env.api.put(kube_api.deployment("llm", NS, replicas=2, kind="StatefulSet"))
    env.api.run_workloads()
    await asyncio.sleep(0)
    kc = env.cluster(scaleTargetRef={"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "llm"})
    from tests.fakes.kube_api import eventually

    await eventually(lambda: env.caches.statefulsets.get(NS, "llm") is not None, "cached")
    state = await env.call(kc.state)
    assert state.removal_order == "highest-ordinal"
    assert (await env.call(env.cluster().state)).removal_order == "deletion-cost"
