"""LocalCluster: real worker processes moved through node, pod-start and model-load delays on the caller's clock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from controller import cluster, policy
from emulation import local, processes
from tests.fakes import specs

WORKER = local.WorkerSpec(slots=2, ttft_s=0.0, seconds_per_token=0.001)


def _spec(*, gpus_per_node: int = 2) -> policy.ScalingPolicySpec:
    return specs.spec(
        streams_per_replica=2, gpus_per_node=gpus_per_node, max_replicas=8, lead_s=(100, 10, 20)
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
    assert sorted(b["pod"] for b in listed) == ["worker-0", "worker-1"]
    assert all(b["max_streams"] == 2 for b in listed)
    assert sorted(cl.addresses()) == ["worker-0", "worker-1"]


def _phase(cl: local.LocalCluster, name: str) -> str:
    return next(p.phase for p in cl.state().pods if p.name == name)


async def test_new_replica_waits_for_a_node_then_pod_start_then_model_load(cl: local.LocalCluster) -> None:
    cl.start(0.0, 2)  # fills the only node (2 GPUs)
    await _tick_until(cl, 0.0, 2)
    cl.set_replicas(3)
    cl.tick(1.0)
    assert _phase(cl, "worker-2") == "pending"
    assert cl.state().pending_gpus == 2
    cl.tick(80.0)  # node takes 100 s ± 20% from its request at 1 s
    assert _phase(cl, "worker-2") == "pending"
    cl.tick(121.5)
    assert _phase(cl, "worker-2") == "starting"
    pod = cl.model.pod_named("worker-2")
    assert pod is not None and pod.running_s is not None and pod.ready_s is not None
    cl.tick(pod.running_s)  # pod start (~10 s) passed: the process is launched
    assert pod.id in cl.processes
    for _ in range(
        200
    ):  # the process answers, but the model load (~20 s) has not passed on the virtual clock
        cl.tick(pod.running_s)
        if processes.listening(cl.host, cl.processes[pod.id].port):
            break
        await asyncio.sleep(0.05)
    cl.tick(pod.running_s)
    assert _phase(cl, "worker-2") == "starting" and cl.state().ready_replicas == 2
    cl.tick(pod.ready_s)
    state = cl.state()
    assert state.ready_replicas == 3
    assert "worker-2" in {b["pod"] for b in json.loads(cl.backends_file.read_text())["backends"]}
    assert state.measured_node_provisioning_s is not None and 80 <= state.measured_node_provisioning_s <= 120
    assert state.measured_model_load_s is not None and 16 <= state.measured_model_load_s <= 24


async def test_a_pod_whose_process_does_not_answer_is_not_ready(cl: local.LocalCluster) -> None:
    cl.start(0.0, 1)
    cl.tick(0.0)  # launched this tick: it cannot be listening yet
    assert cl.state().ready_replicas == 0
    assert json.loads(cl.backends_file.read_text())["backends"] == []
    await _tick_until(cl, 0.0, 1)


async def test_scale_down_follows_the_replicaset_and_drain_is_listed(cl: local.LocalCluster) -> None:
    cl.start(0.0, 2)
    await _tick_until(cl, 0.0, 2)
    cl.annotate("worker-1", {cluster.DRAIN_ANNOTATION: "5"})
    cl.tick(1.0)
    listed = {b["pod"]: b for b in json.loads(cl.backends_file.read_text())["backends"]}
    assert listed["worker-1"].get("drain") is True and "drain" not in listed["worker-0"]
    cl.annotate("worker-0", {cluster.DELETION_COST_ANNOTATION: "-10"})
    victim = cl.processes[0].popen
    cl.set_replicas(1)
    assert len(cl.state().pods) == 2  # intent only: the next tick acts
    cl.tick(2.0)
    assert [p.name for p in cl.state().pods] == ["worker-1"]
    assert victim.poll() is not None and 0 not in cl.processes


async def test_gpu_seconds_billed_per_node_and_stop_leaves_no_process(cl: local.LocalCluster) -> None:
    cl.start(0.0, 1)
    await _tick_until(cl, 0.0, 1)
    cl.tick(3600.0)
    assert cl.gpu_seconds == pytest.approx(2 * 3600.0)
    procs = [p.popen for p in cl.processes.values()]
    cl.stop()
    assert procs and all(p.poll() is not None for p in procs)


def test_using_the_cluster_before_start_says_so(tmp_path: Path) -> None:
    made = local.LocalCluster(_spec(), worker=WORKER, backends_file=tmp_path / "b.json")
    with pytest.raises(RuntimeError, match="start"):
        made.state()
