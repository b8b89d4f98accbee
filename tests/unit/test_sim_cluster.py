"""SimCluster: GPU nodes with lead times, the ReplicaSet's scale-down order, billing and node release."""

from __future__ import annotations

import pytest

from controller import cluster, policy
from emulation import lifecycle, sim
from tests.fakes import specs

START = 1_700_000_000.0


def spec() -> policy.ScalingPolicySpec:
    return specs.spec(
        gpus_per_replica=1, gpus_per_node=2, min_replicas=0, max_replicas=50, lead_s=(300, 60, 120)
    )


def test_new_pod_waits_for_a_node_then_starts_and_loads_within_the_jittered_lead_time() -> None:
    c = sim.SimCluster(spec(), seed=1, start_s=START, node_release_after_s=600)
    c.set_replicas(1)
    st = c.state()
    assert [p.phase for p in st.pods] == ["pending"]
    assert st.pending_gpus == 2  # one 2-GPU node requested
    c.advance(START + 300 * (1 - lifecycle.JITTER) - 1)
    assert c.state().pods[0].phase == "pending"
    c.advance(START + 300 * (1 + lifecycle.JITTER))
    pod = c.state().pods[0]
    assert pod.phase == "starting" and pod.node is not None
    ready_at = c.pods[0].ready_s
    assert ready_at is not None
    lo = START + (300 + 60 + 120) * (1 - lifecycle.JITTER)
    hi = START + (300 + 60 + 120) * (1 + lifecycle.JITTER)
    assert lo <= ready_at <= hi
    c.advance(ready_at)
    assert c.state().ready_replicas == 1
    st = c.state()
    assert st.measured_node_provisioning_s is not None and st.measured_model_load_s is not None


def test_scale_down_removes_the_pods_with_the_lowest_deletion_cost() -> None:
    c = sim.SimCluster(spec(), seed=1, start_s=START, node_release_after_s=600)
    c.bootstrap(4)
    c.annotate("worker-2", {cluster.DELETION_COST_ANNOTATION: "-10"})
    c.annotate("worker-0", {cluster.DELETION_COST_ANNOTATION: "-5"})
    c.set_replicas(2)
    assert sorted(p.name for p in c.state().pods) == ["worker-1", "worker-3"]
    assert sorted(pid for pid, _ in c.removed) == [0, 2]


def test_scale_down_takes_pending_pods_before_ready_ones() -> None:
    c = sim.SimCluster(spec(), seed=1, start_s=START, node_release_after_s=600)
    c.bootstrap(2)
    c.set_replicas(3)  # no room: the third pod is pending
    c.annotate("worker-0", {cluster.DELETION_COST_ANNOTATION: "-10"})
    c.set_replicas(2)
    assert sorted(p.name for p in c.state().pods) == ["worker-0", "worker-1"]


def test_billing_counts_whole_nodes_from_request_to_release() -> None:
    c = sim.SimCluster(spec(), seed=1, start_s=START, node_release_after_s=600)
    c.bootstrap(3)  # two 2-GPU nodes: worker-0 and worker-1 on one, worker-2 on the other
    c.advance(START + 3600)
    assert c.gpu_seconds == pytest.approx(4 * 3600)
    c.annotate("worker-2", {cluster.DELETION_COST_ANNOTATION: "-1"})
    c.set_replicas(2)
    c.advance(START + 3600 + 599)
    assert c.node_gpus() == 4  # one node is empty but not yet unneeded for 10 minutes
    c.advance(START + 3600 + 600)
    assert c.node_gpus() == 2
    assert c.gpu_seconds == pytest.approx(4 * 3600 + 4 * 600)


def test_instant_nodes_schedule_pods_at_once() -> None:
    c = sim.SimCluster(spec(), seed=3, start_s=START, node_release_after_s=0, instant_nodes=True)
    c.set_replicas(3)
    assert all(p.phase == "starting" for p in c.state().pods)
    assert c.node_gpus() == 4


def test_provisioned_gpus_bring_up_nodes_ahead_of_pods() -> None:
    c = sim.SimCluster(spec(), seed=1, start_s=START, node_release_after_s=60)
    c.bootstrap(2)
    c.provision(3)
    assert c.node_gpus() == 2 + 4  # 3 GPUs held ahead round up to two more 2-GPU nodes
    c.advance(START + 400)
    c.set_replicas(4)
    assert sum(1 for p in c.state().pods if p.phase != "pending") == 4  # they fit on the held nodes at once
    assert c.node_gpus() == 8  # and 3 GPUs are still held beyond the 4 pods: one more node
    c.provision(0)
    c.advance(START + 1000)  # every node Ready; the spare ones are unneeded from now
    c.advance(START + 1059)
    assert c.node_gpus() == 8
    c.advance(START + 1060)
    assert c.node_gpus() == 4


def test_same_seed_same_delays() -> None:
    def ready_times(seed: int) -> list[float | None]:
        c = sim.SimCluster(spec(), seed=seed, start_s=START, node_release_after_s=600)
        c.set_replicas(3)
        c.advance(START + 1000)
        return [p.ready_s for p in c.pods.values()]

    assert ready_times(7) == ready_times(7)
    assert ready_times(7) != ready_times(8)
