"""Capacity-holding pods fit where the workers go and are admitted where the workers are.

The target is shaped like a real vLLM worker (CPU and memory beside the GPU, a sidecar, scheduling
constraints) in a namespace enforcing the `restricted` Pod Security Standard; placeholders and the PodTemplates
behind CapacityBuffers copy what decides placement, run the controller's own image, and pass admission.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from contract import clock as clock_mod
from controller import errors, policy
from controller.kube import api as kube_api_mod
from controller.kube import cluster as kube_cluster
from controller.kube import provisioners
from tests.fakes import kube_api
from tests.fakes.kube_api import FakeKubeApi, admission

NS = "llm"

SCHEDULING = {
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}
                        ]
                    }
                ]
            }
        }
    },
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app": "w"}},
        }
    ],
    "runtimeClassName": "nvidia",
    "schedulerName": "default-scheduler",
}


def vllm_like(name: str = "w") -> dict[str, Any]:
    worker = kube_api.deployment(name, NS, replicas=1)
    spec = worker["spec"]["template"]["spec"]
    spec.update(SCHEDULING)
    spec["containers"] = [
        {
            "name": "vllm",
            "image": "vllm/vllm-openai:v0.6.0",
            "resources": {
                "requests": {"cpu": "4", "memory": "32Gi"},
                "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
            },
        },
        {"name": "metrics", "image": "busybox", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
    ]
    spec["initContainers"] = [
        {
            "name": "model-cache",
            "image": "busybox",
            "restartPolicy": "Always",
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        }
    ]
    return worker


class Env:
    def __init__(self, api: FakeKubeApi, clock: clock_mod.FakeClock) -> None:
        self.api, self.clock = api, clock
        self.client = kube_api_mod.client_for(api.url)
        self.caches = kube_cluster.Caches(self.client, namespace=NS)

    def cluster(self, **spec: Any) -> kube_cluster.KubeCluster:
        parsed = policy.parse(kube_api.scaling_policy("w", NS, **spec))
        return kube_cluster.KubeCluster(parsed, api_client=self.client, caches=self.caches, clock=self.clock)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.2) as api:
        api.put(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": NS, "labels": {admission.ENFORCE_LABEL: "restricted"}},
            }
        )
        api.put(vllm_like())
        e = Env(api, clock)
        e.caches.start()
        assert await asyncio.to_thread(e.caches.wait_synced, 10.0)
        try:
            yield e
        finally:
            await asyncio.to_thread(e.caches.stop)
            e.client.close()
        assert api.rejected == [], api.rejected


def holders(api: FakeKubeApi) -> list[dict[str, Any]]:
    return [
        p for p in api.objects("", "pods", NS) if provisioners.PLACEHOLDER_LABEL in p["metadata"]["labels"]
    ]


async def test_placeholders_copy_the_workers_shape_and_pass_restricted_admission(env: Env) -> None:
    """Regression: placeholders requested only the GPU (Karpenter then picked a node the worker does not fit
    on) and carried no securityContext (the restricted namespace refused them)."""
    kc = env.cluster(provisioner={"type": "placeholder"})
    await asyncio.to_thread(kc.provision, 2)
    assert env.api.forbidden == []
    pods = holders(env.api)
    assert len(pods) == 2
    spec = pods[0]["spec"]
    for key, value in SCHEDULING.items():
        assert spec[key] == value, key
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"vllm", "metrics"}
    assert containers["vllm"]["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
    }
    assert containers["metrics"]["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}}
    assert [c["name"] for c in spec["initContainers"]] == ["model-cache"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert images == {provisioners.PLACEHOLDER_IMAGE}
    assert admission.violations(pods[0], "restricted") == []


async def test_capacity_buffer_template_has_the_same_shape(env: Env) -> None:
    kc = env.cluster(provisioner={"type": "capacityBuffer"})
    await asyncio.to_thread(kc.provision, 1)
    template = env.api.get("", "podtemplates", NS, "w-buffer")
    assert template is not None
    spec = template["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia" and spec["topologySpreadConstraints"]
    assert {c["name"] for c in spec["containers"]} == {"vllm", "metrics"}
    assert admission.violations(template["template"], "restricted") == []


async def test_a_priority_class_that_could_preempt_refuses_the_policy(env: Env) -> None:
    env.api.put(
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": "high"},
            "value": 1000,
            "preemptionPolicy": "PreemptLowerPriority",
        }
    )
    kc = env.cluster(provisioner={"type": "placeholder", "placeholder": {"priorityClassName": "high"}})
    with pytest.raises(
        errors.Refused, match="value 1000 and preemptionPolicy PreemptLowerPriority"
    ) as caught:
        await asyncio.to_thread(kc.provision, 1)
    assert caught.value.reason == "PriorityClassRefused"
    assert holders(env.api) == []


def test_placeholder_image_is_not_a_policy_setting() -> None:
    with pytest.raises(errors.InvalidPolicy, match="image: unknown field"):
        policy.parse(
            kube_api.scaling_policy(
                "w", NS, provisioner={"type": "placeholder", "placeholder": {"image": "evil/miner"}}
            )
        )


def test_restricted_admission_refuses_a_bare_pod() -> None:
    pod = {"spec": {"containers": [{"name": "c", "image": "x"}]}}
    found = admission.violations(pod, "restricted")
    assert [f.split(" (")[0] for f in found] == [
        "allowPrivilegeEscalation != false",
        "unrestricted capabilities",
        "runAsNonRoot != true",
        "seccompProfile",
    ]
    assert admission.violations(pod, "baseline") == []


async def test_a_pod_selector_caches_only_model_pods_and_keeps_placeholders_visible() -> None:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.2) as api:
        model = vllm_like()
        model["spec"]["template"]["metadata"]["labels"]["forestall.dev/model"] = "true"
        api.put(model)
        api.put(kube_api.deployment("unrelated", NS, replicas=3))
        api.run_workloads()
        api_client = kube_api_mod.client_for(api.url)
        caches = kube_cluster.Caches(api_client, namespace=NS, pod_selector="forestall.dev/model=true")
        caches.start()
        try:
            assert await asyncio.to_thread(caches.wait_synced, 10.0)
            cached = {p["metadata"]["labels"]["app"] for p in caches.pods.items(NS)}
            assert cached == {"w"}, "pods of other workloads are not held in memory"
            parsed = policy.parse(kube_api.scaling_policy("w", NS, provisioner={"type": "placeholder"}))
            kc = kube_cluster.KubeCluster(parsed, api_client=api_client, caches=caches, clock=clock)
            await asyncio.to_thread(kc.provision, 1)
            await kube_api.eventually(lambda: len(holders(api)) == 1, "placeholder created")
            [holder] = holders(api)
            assert holder["metadata"]["labels"]["forestall.dev/model"] == "true"
            await kube_api.eventually(
                lambda: caches.pods.get(NS, holder["metadata"]["name"]) is not None, "placeholder cached"
            )
        finally:
            await asyncio.to_thread(caches.stop)
            api_client.close()


def test_a_pod_selector_must_be_equality_terms() -> None:
    assert kube_cluster.selector_labels("a=b, c=d") == {"a": "b", "c": "d"}
    for bad in ("a!=b", "a in (b)", "a==b", "=b"):
        with pytest.raises(ValueError, match="key=value"):
            kube_cluster.selector_labels(bad)
