"""LocalCluster: real worker processes moved through node, pod-start and model-load delays on the caller's clock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from controller import cluster, policy
from emulation import local

WORKER = local.WorkerSpec(slots=2, ttft_s=0.0, seconds_per_token=0.001)


def _spec(*, gpus_per_node: int = 2) -> policy.ScalingPolicySpec:
    return policy.ScalingPolicySpec.model_validate(
        {
            "scaleTargetRef": {"kind": "Deployment", "name": "w"},
            "demand": {"balancer": {"service": "b"}},
            "capacity": {"streamsPerReplica": 2, "gpusPerNode": gpus_per_node},
            "replicas": {"max": 8},
            "leadTime": {"nodeProvisioningSeconds": 100, "podStartSeconds": 10, "modelLoadSeconds": 20},
        }
    )


async def _tick_until(cl: local.LocalCluster, now: float, ready: int) -> None:
    """Tick at a fixed virtual time until `ready` pods are Ready: waits only for real processes to listen."""
    for _ in range(200):
        cl.tick(now)
        if cl.ready_replicas >= ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {cl.ready_replicas} of {ready} pods became ready")


@pytest.fixture
def cl(tmp_path: Path) -> local.LocalCluster:
    made = local.LocalCluster(_spec(), worker=WORKER, backends_file=tmp_path / "b.json", seed=3)
    yield made
    made.stop()


async def test_initial_replicas_serve_at_once_and_appear_in_backends_file(cl: local.LocalCluster) -> None:
    cl.start(0.0, 2)
    await _tick_until(cl, 0.0, 2)
    listed = json.loads(cl.backends_file.read_text())["backends"]
    assert sorted(b["pod"] for b in listed) == ["worker-1", "worker-2"]
    assert all(b["max_streams"] == 2 for b in listed)


async def test_new_replica_waits_for_a_node_then_pod_start_then_model_load(cl: local.LocalCluster) -> None:
    cl.start(0.0, 2)  # fills the only node (2 GPUs)
    await _tick_until(cl, 0.0, 2)
    cl.set_replicas(3)
    cl.tick(1.0)
    new = next(p for p in cl.state().pods if p.name == "worker-3")
    assert new.phase == "pending"
    assert cl.state().pending_gpus == 2
    cl.tick(79.0)  # node takes 100 s ± 20%
    assert next(p for p in cl.state().pods if p.name == "worker-3").phase == "pending"
    cl.tick(121.0)
    pod = next(p for p in cl.state().pods if p.name == "worker-3")
    assert pod.phase == "starting"
    await _tick_until(cl, 200.0, 2)  # pod start (~10 s) passed: the process is launched
    for _ in range(200):
        cl.tick(200.0)
        if next(p for p in cl.state().pods if p.name == "worker-3").phase == "ready":
            break
        await asyncio.sleep(0.05)
    state = cl.state()
    assert state.ready_replicas == 2  # model load (~20 s) has not passed on the virtual clock yet
    cl.tick(240.0)
    state = cl.state()
    assert state.ready_replicas == 3
    assert state.measured_node_provisioning_s is not None and 80 <= state.measured_node_provisioning_s <= 121
    assert state.measured_model_load_s is not None and 16 <= state.measured_model_load_s <= 40


async def test_scale_down_removes_lowest_deletion_cost_and_drain_is_listed(cl: local.LocalCluster) -> None:
    cl.start(0.0, 2)
    await _tick_until(cl, 0.0, 2)
    cl.annotate("worker-2", {cluster.DRAIN_ANNOTATION: "5"})
    cl.tick(1.0)
    listed = {b["pod"]: b for b in json.loads(cl.backends_file.read_text())["backends"]}
    assert listed["worker-2"].get("drain") is True and "drain" not in listed["worker-1"]
    cl.annotate("worker-1", {cluster.DELETION_COST_ANNOTATION: "-10"})
    cl.set_replicas(1)
    cl.tick(2.0)
    assert [p.name for p in cl.state().pods] == ["worker-2"]


async def test_gpu_seconds_billed_per_node_and_stop_leaves_no_process(cl: local.LocalCluster) -> None:
    cl.start(0.0, 1)
    await _tick_until(cl, 0.0, 1)
    cl.tick(3600.0)
    assert cl.gpu_seconds == pytest.approx(2 * 3600.0)
    procs = [p.process for p in cl._pods.values()]
    cl.stop()
    assert all(p is not None and p.poll() is not None for p in procs)
