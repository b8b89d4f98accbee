"""A mixed GPU pool in the simulator: nodes of each `capacity.gpuTypes` entry, pods sized by their node's type,
streams placed by load relative to each pod's own slots, and decide() sizing by per-type capacity."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from controller import policy
from emulation import sim, simulate, streams
from tests.unit.test_sim_scenarios import request_trace

START = 1_700_000_000.0


def mixed_spec(*, typed: bool = True, fast_spr: int = 8) -> policy.ScalingPolicySpec:
    capacity: dict[str, object] = {"streamsPerReplica": 4, "gpusPerReplica": 1, "gpusPerNode": 2}
    if typed:
        capacity["gpuTypes"] = [
            {"name": "NVIDIA-H100-80GB-HBM3", "streamsPerReplica": fast_spr},
            {"name": "NVIDIA-L40S", "streamsPerReplica": 4},
        ]
    return policy.ScalingPolicySpec.model_validate(
        {
            "scaleTargetRef": {"kind": "Deployment", "name": "llm"},
            "demand": {"prometheus": {"query": "q"}},
            "capacity": capacity,
            "replicas": {"min": 1, "max": 40},
            "leadTime": {"nodeProvisioningSeconds": 360, "podStartSeconds": 60, "modelLoadSeconds": 120},
        }
    )


def test_nodes_take_the_listed_types_in_turn_and_pods_their_slots() -> None:
    c = sim.SimCluster(mixed_spec(), seed=0, start_s=START, node_release_after_s=600)
    c.bootstrap(4)  # two 2-GPU nodes
    products = [n.gpu_product for n in c.state().nodes]
    assert products == ["NVIDIA-H100-80GB-HBM3", "NVIDIA-L40S"]
    by_node = {n.name: n.gpu_product for n in c.state().nodes}
    slots = c.pod_slots()
    for p in c.pods.values():
        assert slots[p.id] == (8 if by_node[p.node or ""] == "NVIDIA-H100-80GB-HBM3" else 4)
    plain = sim.SimCluster(mixed_spec(typed=False), seed=0, start_s=START, node_release_after_s=600)
    plain.bootstrap(2)
    assert [n.gpu_product for n in plain.state().nodes] == [None]


def test_weighted_placement_fills_pods_in_proportion_to_their_slots() -> None:
    pods = np.array([0, 1], dtype=np.int64)
    out = streams.place_weighted(
        20, pods, np.zeros(2, dtype=np.int64), slots=np.array([10, 30]), rng=random.Random(0)
    )
    assert np.bincount(out, minlength=2).tolist() == [5, 15]  # both half full
    # One pod already loaded: the new streams go to the other until their relative loads meet.
    out = streams.place_weighted(4, pods, np.array([5, 0]), slots=np.array([10, 10]), rng=random.Random(0))
    assert np.bincount(out, minlength=2).tolist() == [0, 4]
    # More streams than free slots: all slots taken, the rest wait on the least loaded pod.
    out = streams.place_weighted(
        45, pods, np.zeros(2, dtype=np.int64), slots=np.array([10, 30]), rng=random.Random(0)
    )
    assert np.bincount(out, minlength=2).tolist() == [15, 30]


def test_a_mixed_pool_of_bigger_gpus_serves_the_same_streams_on_fewer_gpu_hours(tmp_path: Path) -> None:
    """decide() counts an H100 pod for 8 streams and the simulator lets it carry 8: the same trace needs fewer
    GPUs than when every pod is taken for 4 (the policy without gpuTypes)."""
    trace = request_trace(tmp_path, [(60, 2.0), (60, 8.0), (60, 2.0)])
    typed = simulate.simulate(trace, mixed_spec(fast_spr=12), policies=("forestall",))
    plain = simulate.simulate(trace, mixed_spec(typed=False), policies=("forestall",))
    t, p = typed.policies["forestall"], plain.policies["forestall"]
    assert t.arrived == p.arrived
    assert t.slo_attainment >= 0.99 and t.cut == 0
    assert t.gpu_hours < 0.85 * p.gpu_hours
