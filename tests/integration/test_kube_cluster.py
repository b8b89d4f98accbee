"""KubeCluster against the in-test API server, through the real `kubernetes` client.

Every write the controller makes is validated by the fake server (kubernetes-validate for built-in kinds, the
CRD schemas for custom ones), so `api.rejected == []` at the end of a test means every body was valid.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from contract import clock as clock_mod
from controller import cluster, errors, policy
from controller.kube import api as kube_api_mod
from controller.kube import cluster as kube_cluster
from controller.kube import provisioners
from tests.fakes import kube_api
from tests.fakes.kube_api import FakeKubeApi, eventually

NS = "llm"


class Env:
    def __init__(self, api: FakeKubeApi, clock: clock_mod.FakeClock) -> None:
        self.api = api
        self.clock = clock
        self.client = kube_api_mod.client_for(api.url)
        self.caches = kube_cluster.Caches(self.client, namespace=NS)

    def cluster(self, **spec: Any) -> kube_cluster.KubeCluster:
        parsed = policy.parse(kube_api.scaling_policy("w", NS, **spec))
        return kube_cluster.KubeCluster(parsed, api_client=self.client, caches=self.caches, clock=self.clock)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.2) as api:
        api.put(kube_api.deployment("w", NS, replicas=2))
        api.run_workloads()
        e = Env(api, clock)
        e.caches.start()
        assert await asyncio.to_thread(e.caches.wait_synced, 10.0)
        try:
            yield e
        finally:
            await asyncio.to_thread(e.caches.stop)
            e.client.close()
        assert api.rejected == [], api.rejected


def pod_names(api: FakeKubeApi) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in api.objects("", "pods", NS)
        if p["metadata"]["labels"].get("app") == "w"
    ]


async def test_state_reports_pods_by_phase_and_measured_lead_times(env: Env) -> None:
    api, clock = env.api, env.clock
    api.put(kube_api.gpu_node("gpu-a", created=clock_mod.utc_iso(clock.now())))
    clock.advance(240)  # the node takes 4 minutes to become Ready
    node = api.get("", "nodes", "", "gpu-a")
    assert node is not None
    node["metadata"]["labels"][cluster.GPU_PRODUCT_LABEL] = "NVIDIA-H100-80GB-HBM3"  # GPU feature discovery
    node["status"]["conditions"][0]["lastTransitionTime"] = clock_mod.utc_iso(clock.now())
    api.put(node)
    first, second = pod_names(api)
    clock.advance(30)
    api.set_pod_state(NS, first, node="gpu-a")  # scheduled 270 s after creation (waited for the node)
    clock.advance(45)
    api.set_pod_state(NS, first, running=True)  # image pulled: 45 s pod start
    clock.advance(100)
    api.set_pod_state(NS, first, ready=True)  # model loaded: 100 s
    kc = env.cluster()
    await eventually(
        lambda: (
            env.caches.pods.get(NS, first) is not None
            and kc.pods()[0]["status"].get("conditions") is not None
            and any(
                c["type"] == "Ready" for c in (env.caches.pods.get(NS, first) or {})["status"]["conditions"]
            )
        ),
        "pod ready in cache",
    )

    state = await env.call(kc.state)

    phases = {p.name: p.phase for p in state.pods}
    assert phases == {first: "ready", second: "pending"}
    assert state.spec_replicas == 2
    assert state.ready_replicas == 1
    assert state.pending_gpus == 1  # the pending pod's GPU
    assert [(n.name, n.gpus, n.ready) for n in state.nodes] == [("gpu-a", 8, True)]
    assert state.nodes[0].gpu_product == "NVIDIA-H100-80GB-HBM3"  # matched against capacity.gpuTypes
    assert state.measured_node_provisioning_s == pytest.approx(240.0)
    assert state.measured_pod_start_s == pytest.approx(45.0)
    assert state.measured_model_load_s == pytest.approx(100.0)


async def test_set_replicas_writes_the_scale_subresource(env: Env) -> None:
    kc = env.cluster()
    await env.call(kc.set_replicas, 5)
    stored = env.api.get("apps", "deployments", NS, "w")
    assert stored is not None and stored["spec"]["replicas"] == 5
    assert ("apps", "deployments/scale", "update") in env.api.rbac_rules()
    # the controller's cache saw its own write at once: the next state() does not act on a stale count
    assert (await env.call(kc.state)).spec_replicas == 5
    env.api.run_workloads()
    assert len(pod_names(env.api)) == 5


async def test_set_replicas_on_a_statefulset(env: Env) -> None:
    env.api.put(kube_api.deployment("db", NS, replicas=1, kind="StatefulSet"))
    await eventually(lambda: env.caches.statefulsets.get(NS, "db") is not None, "statefulset cached")
    kc = env.cluster(scaleTargetRef={"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"})
    await env.call(kc.set_replicas, 3)
    stored = env.api.get("apps", "statefulsets", NS, "db")
    assert stored is not None and stored["spec"]["replicas"] == 3
    assert ("apps", "statefulsets/scale", "get") in env.api.rbac_rules()


async def test_a_stale_scale_write_is_re_read_and_retried(env: Env) -> None:
    """Someone scaled between our read and our write: the 409 makes us read again, not overwrite blindly."""
    env.api.inject_error("PUT", r"/deployments/w/scale$", 409)
    kc = env.cluster()
    await env.call(kc.set_replicas, 4)
    assert len(env.api.calls("update", "deployments", "scale")) == 2
    stored = env.api.get("apps", "deployments", NS, "w")
    assert stored is not None and stored["spec"]["replicas"] == 4


async def test_persistent_conflicts_reach_the_loop_as_conflict(env: Env) -> None:
    env.api.inject_error("PUT", r"/deployments/w/scale$", 409, times=kube_cluster.SCALE_CONFLICT_ATTEMPTS)
    kc = env.cluster()
    with pytest.raises(errors.Conflict) as caught:
        await env.call(kc.set_replicas, 4)
    assert caught.value.__cause__ is not None  # the client's ApiException stays attached
    stored = env.api.get("apps", "deployments", NS, "w")
    assert stored is not None and stored["spec"]["replicas"] == 2


async def test_temporary_failures_are_retried_and_permanent_ones_are_not(env: Env) -> None:
    env.api.inject_error("GET", r"/deployments/w/scale$", 503)
    kc = env.cluster()
    await env.call(kc.set_replicas, 3)
    assert len(env.api.calls("get", "deployments", "scale")) == 2

    env.api.inject_error("GET", r"/deployments/w/scale$", 403)
    with pytest.raises(errors.ClusterError) as caught:
        await env.call(kc.set_replicas, 6)
    assert not isinstance(caught.value, errors.Conflict | errors.NotFound)
    assert len(env.api.calls("get", "deployments", "scale")) == 3  # one attempt only

    missing = env.cluster(scaleTargetRef={"apiVersion": "apps/v1", "kind": "Deployment", "name": "nope"})
    with pytest.raises(errors.NotFound, match="scale target Deployment llm/nope not found"):
        await env.call(missing.state)


async def test_annotate_merges_removes_and_skips_what_is_already_there(env: Env) -> None:
    kc = env.cluster()
    pod = pod_names(env.api)[0]
    await env.call(
        kc.annotate,
        pod,
        {cluster.DRAIN_ANNOTATION: "1800000000.000", cluster.DO_NOT_DISRUPT_ANNOTATION: "true"},
    )
    stored = env.api.get("", "pods", NS, pod)
    assert stored is not None
    assert stored["metadata"]["annotations"][cluster.DRAIN_ANNOTATION] == "1800000000.000"
    assert stored["metadata"]["annotations"][cluster.DO_NOT_DISRUPT_ANNOTATION] == "true"
    patches = len(env.api.calls("patch", "pods"))

    await env.call(kc.annotate, pod, {cluster.DO_NOT_DISRUPT_ANNOTATION: "true"})
    assert len(env.api.calls("patch", "pods")) == patches  # nothing to change, no call

    await env.call(kc.annotate, pod, {cluster.DO_NOT_DISRUPT_ANNOTATION: None})
    stored = env.api.get("", "pods", NS, pod)
    assert stored is not None
    assert cluster.DO_NOT_DISRUPT_ANNOTATION not in stored["metadata"]["annotations"]
    assert cluster.DRAIN_ANNOTATION in stored["metadata"]["annotations"]

    with pytest.raises(errors.NotFound):
        await env.call(kc.annotate, "gone", {cluster.DRAIN_ANNOTATION: "1"})


async def test_our_deletion_cost_can_be_raised_and_lowered_and_an_overwrite_is_reported(env: Env) -> None:
    """Regression: a deletion cost was set once and never changed, so a raised cost could not be lowered."""
    kc = env.cluster()
    pod = pod_names(env.api)[0]
    await env.call(kc.annotate, pod, {cluster.DELETION_COST_ANNOTATION: "100"})
    await env.call(kc.annotate, pod, {cluster.DELETION_COST_ANNOTATION: "-5"})
    stored = env.api.get("", "pods", NS, pod)
    assert stored is not None and stored["metadata"]["annotations"][cluster.DELETION_COST_ANNOTATION] == "-5"
    await env.call(kc.state)
    assert kc.deletion_cost_overwrites() == {}

    stored["metadata"]["annotations"][cluster.DELETION_COST_ANNOTATION] = "100"  # e.g. Karpenter
    env.api.put(stored)
    await eventually(
        lambda: (
            (env.caches.pods.get(NS, pod) or {})["metadata"]["annotations"].get(
                cluster.DELETION_COST_ANNOTATION
            )
            == "100"
        ),
        "overwrite seen by the watch",
    )
    await env.call(kc.state)
    assert kc.deletion_cost_overwrites() == {pod: "100"}
    # not fought over: no second write of our value
    await env.call(kc.annotate, pod, {cluster.DELETION_COST_ANNOTATION: "-5"})
    stored = env.api.get("", "pods", NS, pod)
    assert stored is not None and stored["metadata"]["annotations"][cluster.DELETION_COST_ANNOTATION] == "100"


async def test_scale_down_removes_the_pod_with_the_lowest_deletion_cost(env: Env) -> None:
    kc = env.cluster()
    pods = pod_names(env.api)
    for name in pods:
        env.api.set_pod_state(NS, name, node="gpu-a", running=True, ready=True)
    chosen = pods[1]
    await env.call(kc.annotate, chosen, {cluster.DELETION_COST_ANNOTATION: "-1"})
    await env.call(kc.set_replicas, 1)
    env.api.run_workloads()
    assert pod_names(env.api) == [pods[0]]


async def test_pods_provisioner_holds_nothing_extra(env: Env) -> None:
    kc = env.cluster()
    writes = len([c for c in env.api.recorded_calls if c.verb not in ("get", "list", "watch")])
    await env.call(kc.provision, 16)
    assert len([c for c in env.api.recorded_calls if c.verb not in ("get", "list", "watch")]) == writes
    assert (await env.call(kc.state)).provisioned_gpus == 0


async def test_capacity_buffer_uses_the_version_the_server_serves() -> None:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    resources = kube_api.default_resources(capacity_buffer_versions=("v1alpha1",))
    async with FakeKubeApi(clock=clock, resources=resources, bookmark_interval_s=0.2) as api:
        api.put(kube_api.deployment("w", NS, replicas=1, gpus=2))
        e = Env(api, clock)
        e.caches.start()
        try:
            assert await asyncio.to_thread(e.caches.wait_synced, 10.0)
            kc = e.cluster(
                provisioner={"type": "capacityBuffer"},
                capacity={"streamsPerReplica": 10, "gpusPerReplica": 2},
            )
            await e.call(kc.provision, 5)  # 5 GPUs at 2 per replica: 3 chunks
            buffer = api.get("autoscaling.x-k8s.io", "capacitybuffers", NS, "w-buffer")
            assert buffer is not None
            assert buffer["apiVersion"] == "autoscaling.x-k8s.io/v1alpha1"
            assert buffer["spec"]["replicas"] == 3
            template = api.get("", "podtemplates", NS, buffer["spec"]["podTemplateRef"]["name"])
            assert template is not None
            container = template["template"]["spec"]["containers"][0]
            assert container["resources"]["requests"] == {"nvidia.com/gpu": "2"}
            assert template["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert (await e.call(kc.state)).provisioned_gpus == 6

            await e.call(kc.provision, 0)
            buffer = api.get("autoscaling.x-k8s.io", "capacitybuffers", NS, "w-buffer")
            assert buffer is not None and buffer["spec"]["replicas"] == 0
            assert api.rejected == []
        finally:
            await asyncio.to_thread(e.caches.stop)
            e.client.close()


async def test_capacity_buffer_without_the_crd_is_a_clear_error() -> None:
    clock = clock_mod.FakeClock()
    resources = [r for r in kube_api.default_resources() if r.plural != "capacitybuffers"]
    async with FakeKubeApi(clock=clock, resources=resources) as api:
        client = kube_api_mod.client_for(api.url)
        caches = kube_cluster.Caches(client, namespace=NS)
        parsed = policy.parse(kube_api.scaling_policy("w", NS, provisioner={"type": "capacityBuffer"}))
        kc = kube_cluster.KubeCluster(parsed, api_client=client, caches=caches, clock=clock)
        with pytest.raises(errors.ClusterError, match=r"serves no autoscaling\.x-k8s\.io CapacityBuffer"):
            await asyncio.to_thread(kc.provision, 2)
        client.close()


async def test_placeholder_pods_hold_gpus_at_low_priority(env: Env) -> None:
    kc = env.cluster(provisioner={"type": "placeholder"})
    await env.call(kc.provision, 3)
    priority = env.api.get("scheduling.k8s.io", "priorityclasses", "", "forestall-placeholder")
    assert priority is not None
    assert priority["preemptionPolicy"] == "Never" and priority["value"] < 0
    holders = [
        p
        for p in env.api.objects("", "pods", NS)
        if provisioners.PLACEHOLDER_LABEL in p["metadata"]["labels"]
    ]
    assert len(holders) == 3
    assert {p["spec"]["priorityClassName"] for p in holders} == {"forestall-placeholder"}
    assert all(
        p["spec"]["containers"][0]["resources"]["requests"] == {"nvidia.com/gpu": "1"} for p in holders
    )
    state = await env.call(kc.state)
    assert [p.name for p in state.pods] == sorted(
        pod_names(env.api)
    )  # placeholders are not the target's pods
    assert (state.provisioned_gpus, state.pending_gpus) == (3, 3 + 2)  # 3 pending holders + 2 pending workers

    env.api.set_pod_state(NS, holders[0]["metadata"]["name"], node="gpu-a")
    await eventually(
        lambda: bool(
            (env.caches.pods.get(NS, holders[0]["metadata"]["name"]) or {}).get("spec", {}).get("nodeName")
        ),
        "bound",
    )
    await env.call(kc.provision, 1)
    left = [
        p["metadata"]["name"]
        for p in env.api.objects("", "pods", NS)
        if provisioners.PLACEHOLDER_LABEL in p["metadata"]["labels"]
    ]
    assert left == [holders[0]["metadata"]["name"]]  # the pending ones went first


async def test_provisioning_request_is_renewed_before_its_booking_lapses(env: Env) -> None:
    kc = env.cluster(
        provisioner={"type": "provisioningRequest", "provisioningRequest": {"bookingSeconds": 600}}
    )
    group = "autoscaling.x-k8s.io"
    await env.call(kc.provision, 2)
    [request] = env.api.objects(group, "provisioningrequests", NS)
    assert request["spec"]["podSets"] == [{"podTemplateRef": {"name": "w-provreq"}, "count": 2}]
    assert request["spec"]["provisioningClassName"] == "best-effort-atomic-scale-up.autoscaling.x-k8s.io"
    assert env.api.get("", "podtemplates", NS, "w-provreq") is not None
    assert (await env.call(kc.state)).pending_gpus >= 2

    # cluster-autoscaler provisions it
    request["status"] = {
        "conditions": [
            {
                "type": "Provisioned",
                "status": "True",
                "reason": "Provisioned",
                "message": "",
                "lastTransitionTime": clock_mod.utc_iso(env.clock.now()),
            }
        ]
    }
    env.api.put(request)
    assert (await env.call(kc.state)).provisioned_gpus == 2
    await env.call(kc.provision, 2)
    assert [r["metadata"]["name"] for r in env.api.objects(group, "provisioningrequests", NS)] == [
        request["metadata"]["name"]
    ]

    env.clock.advance(600 - provisioners.RENEW_MARGIN_S + 1)
    assert (await env.call(kc.state)).provisioned_gpus == 0  # about to lapse: no longer counted as held
    await env.call(kc.provision, 2)
    [renewed] = env.api.objects(group, "provisioningrequests", NS)
    assert renewed["metadata"]["name"] != request["metadata"]["name"]
    assert renewed["spec"]["podSets"][0]["count"] == 2

    await env.call(kc.provision, 3)  # a new count is a new request (the spec is immutable)
    [bigger] = env.api.objects(group, "provisioningrequests", NS)
    assert bigger["spec"]["podSets"][0]["count"] == 3
    await env.call(kc.provision, 0)
    assert env.api.objects(group, "provisioningrequests", NS) == []


async def test_balancer_replicas_are_found_through_serving_endpoints_terminating_or_not(env: Env) -> None:
    """Regression: terminating-but-serving balancer replicas were dropped, so the pods reached only through
    them looked empty (and could be removed mid-stream) while the snapshot still counted as complete."""
    env.api.put(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "balancer-abc",
                "namespace": NS,
                "labels": {"kubernetes.io/service-name": "balancer"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": True, "serving": True}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": False, "serving": False}},
                {
                    "addresses": ["10.1.0.3"],
                    "conditions": {"ready": False, "serving": True, "terminating": True},
                },
                {
                    "addresses": ["10.1.0.4"],
                    "conditions": {"ready": False, "serving": False, "terminating": True},
                },
                {"addresses": ["10.1.0.5"], "conditions": {"ready": True}},  # no `serving`: ready decides
            ],
            "ports": [{"name": "admin", "port": 8081, "protocol": "TCP"}],
        }
    )
    await eventually(lambda: env.caches.service_addresses(NS, "balancer") != [], "slice cached")
    assert env.caches.service_addresses(NS, "balancer") == ["10.1.0.1", "10.1.0.3", "10.1.0.5"]
    assert env.caches.service_addresses(NS, "other") == []
