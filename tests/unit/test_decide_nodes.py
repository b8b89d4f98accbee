"""`decide()` with the bill in view: GPU nodes, not pods, are billed, so scale-down empties whole nodes."""

from __future__ import annotations

import dataclasses

from controller import cluster
from tests.unit.test_decide import NOW, codes, flat, make_signals, make_spec, make_state, ready_pods, run


def _placed(placement: dict[str, str | None]) -> tuple[cluster.PodState, ...]:
    return tuple(dataclasses.replace(p, node=placement[p.name]) for p in ready_pods(len(placement)))


def _nodes(*names: str, gpus: int = 8) -> tuple[cluster.NodeState, ...]:
    return tuple(cluster.NodeState(name=n, gpus=gpus, ready=True, created_s=NOW - 7200) for n in names)


def test_surplus_smaller_than_any_node_drains_nothing() -> None:
    """Regression: 3 surplus replicas were drained from a node of 4 that stayed (saving nothing, costing
    headroom, and undrained at the next bump: the drain/undrain churn of the e2e run)."""
    spec = make_spec(
        scaleDown={"maxPodsPerMinute": 4, "stabilizationWindowSeconds": 600, "drainTimeoutSeconds": 300}
    )
    placement = {f"w{i}": ("n1" if i < 4 else "n2") for i in range(8)}
    sigs = make_signals({f"w{i}": 5 for i in range(8)})
    plan = run(spec, NOW, flat(45), sigs, make_state(8, pods=_placed(placement), nodes=_nodes("n1", "n2")))
    # 45 streams need 5 replicas: 3 surplus, but each node serves 4.
    assert plan.drain == ()
    assert "WholeNodeHold" in codes(plan) and plan.desired_replicas == 8


def test_nodes_shared_with_other_workloads_give_back_pods_one_by_one() -> None:
    """`scaleDown.wholeNodes: false`: the same surplus drains 3 pods from one node (their GPUs serve other
    workloads), the least used first, and never more than the surplus."""
    spec = make_spec(
        scaleDown={
            "maxPodsPerMinute": 4,
            "stabilizationWindowSeconds": 600,
            "drainTimeoutSeconds": 300,
            "wholeNodes": False,
        }
    )
    placement = {f"w{i}": ("n1" if i < 4 else "n2") for i in range(8)}
    sigs = make_signals({f"w{i}": 5 for i in range(8)} | {"w1": 1, "w2": 2})
    plan = run(spec, NOW, flat(45), sigs, make_state(8, pods=_placed(placement), nodes=_nodes("n1", "n2")))
    assert len(plan.drain) == 3 and {"w1", "w2"} <= set(plan.drain)
    assert all(placement[name] == "n1" for name in plan.drain)
    assert "WholeNodeHold" not in codes(plan)


def test_surplus_covering_a_node_drains_all_of_it_before_touching_another() -> None:
    spec = make_spec(
        scaleDown={"maxPodsPerMinute": 8, "stabilizationWindowSeconds": 600, "drainTimeoutSeconds": 300}
    )
    placement = {
        "w0": "n1",
        "w1": "n1",
        "w2": "n1",
        "w3": "n2",
        "w4": "n2",
        "w5": "n3",
        "w6": "n3",
        "w7": "n3",
    }
    loads = {"w0": 1, "w1": 1, "w2": 1, "w3": 6, "w4": 0, "w5": 0, "w6": 0, "w7": 0}
    plan = run(
        spec,
        NOW,
        flat(9),
        make_signals(loads),
        make_state(8, pods=_placed(placement), nodes=_nodes("n1", "n2", "n3")),
    )
    # 9 streams need 1 replica: 7 surplus. n2 (2 pods) goes first, then the idler of the 3-pod nodes (n3),
    # and not a single pod of n1, which 7 - 2 - 3 = 2 cannot empty.
    assert plan.drain == ("w4", "w3", "w7", "w6", "w5")  # idle ones newest first


def test_pods_not_on_a_node_go_before_any_node_is_touched() -> None:
    spec = make_spec(
        scaleDown={"maxPodsPerMinute": 2, "stabilizationWindowSeconds": 600, "drainTimeoutSeconds": 300}
    )
    pods = (
        *_placed({"w0": "n1", "w1": "n1", "w2": "n2"}),
        cluster.PodState(name="p0", phase="pending", created_s=NOW - 100),
    )
    sigs = make_signals({"w0": 5, "w1": 5, "w2": 5})
    plan = run(spec, NOW, flat(15), sigs, make_state(4, pods=pods, nodes=_nodes("n1", "n2")))
    # 15 streams need 2 replicas: 2 surplus, the pending pod and n2's lone pod.
    assert plan.drain == ("p0", "w2")


def _typed_spec(**scale_down: float) -> object:
    return make_spec(
        capacity={
            "streamsPerReplica": 10,
            "gpuTypes": [{"name": "NVIDIA-H100-80GB-HBM3", "streamsPerReplica": 20}],
        },
        scaleDown={
            "maxPodsPerMinute": 4,
            "stabilizationWindowSeconds": 600,
            "drainTimeoutSeconds": 300,
            **scale_down,
        },
    )


def _typed_state() -> cluster.ClusterState:
    pods = _placed({"w0": "h1", "w1": "h1", "w2": "a1", "w3": "a1"})
    nodes = (
        cluster.NodeState(
            name="h1", gpus=8, ready=True, created_s=NOW - 7200, gpu_product="NVIDIA-H100-80GB-HBM3"
        ),
        cluster.NodeState(
            name="a1", gpus=8, ready=True, created_s=NOW - 7200, gpu_product="NVIDIA-A100-SXM4-40GB"
        ),
    )
    return make_state(4, pods=pods, nodes=nodes)


def test_pods_on_a_listed_gpu_type_count_for_its_streams_per_replica() -> None:
    """2 pods on H100 (20 streams each) + 2 on an unlisted A100 (10, the default) carry 60 streams."""
    spec = _typed_spec()
    sigs = make_signals({"w0": 20, "w1": 20, "w2": 8, "w3": 7})
    plan = run(spec, NOW, flat(55), sigs, _typed_state())
    assert plan.desired_replicas == 4 and "ScaleUp" not in codes(plan)
    plan = run(spec, NOW, flat(75), sigs, _typed_state())
    assert plan.desired_replicas == 6  # 15 streams short: two new pods, counted at the default 10 each
    # The balancer weighs each pod by what it carries: the H100 pods get weight 2, the others keep 1.
    assert plan.capacity_weight == {"w0": 2.0, "w1": 2.0}


def test_scale_down_counts_a_node_by_the_capacity_of_its_gpu_type() -> None:
    spec = _typed_spec()
    sigs = make_signals({"w0": 5, "w1": 5, "w2": 3, "w3": 2})
    plan = run(spec, NOW, flat(15), sigs, _typed_state())
    # 15 streams need 2 default replicas, 6 serve: the A100 node's 2 (surplus 4 covers them) go, the H100
    # node's 4 do not fit in what is left.
    assert plan.drain == ("w3", "w2")


def test_capacity_weight_is_written_once() -> None:
    spec = _typed_spec()
    state = _typed_state()
    marked = tuple(
        dataclasses.replace(p, annotations={"forestall.dev/capacity-weight": "2"}) if p.node == "h1" else p
        for p in state.pods
    )
    sigs = make_signals({"w0": 20, "w1": 20, "w2": 8, "w3": 7})
    plan = run(spec, NOW, flat(55), sigs, dataclasses.replace(state, pods=marked))
    assert plan.capacity_weight == {}
    plain = run(make_spec(), NOW, flat(55), sigs, state)
    assert plain.capacity_weight == {}  # no gpuTypes: the balancer's default weight stands


def _full_nodes() -> cluster.ClusterState:
    placement = {f"w{i}": ("n1" if i < 8 else "n2") for i in range(16)}
    return make_state(16, pods=_placed(placement), nodes=_nodes("n1", "n2"))


def test_forecast_a_sliver_above_the_nodes_does_not_open_a_node() -> None:
    """Two full 8-GPU nodes hold 16 replicas: a forecast needing 17 (one replica over) would bill a third node
    for a lead time; one needing 21 (more than a quarter of what the nodes hold over) opens it."""
    sigs = make_signals({f"w{i}": 8 for i in range(16)})
    plan = run(make_spec(replicas={"min": 1, "max": 40}), NOW, flat(128, forecast=170), sigs, _full_nodes())
    assert plan.desired_replicas == 16 and "NodeTolerance" in codes(plan)
    plan = run(make_spec(replicas={"min": 1, "max": 40}), NOW, flat(128, forecast=210), sigs, _full_nodes())
    assert plan.desired_replicas == 21 and "NodeTolerance" not in codes(plan)


def test_demand_now_above_the_nodes_is_never_held_back() -> None:
    sigs = make_signals({f"w{i}": 10 for i in range(16)}, admission_queue=5)
    plan = run(make_spec(replicas={"min": 1, "max": 40}), NOW, flat(165, forecast=170), sigs, _full_nodes())
    assert plan.desired_replicas == 17  # 165 streams now need 17: the reactive floor is not a forecast margin


def test_pods_on_nodes_the_snapshot_does_not_list_drain_one_by_one() -> None:
    """Without a node's GPUs in view there is no whole node to empty: the idlest pod goes, as before."""
    placement = {f"w{i}": "gpu-a" for i in range(3)}
    sigs = make_signals({"w0": 6, "w1": 0, "w2": 2})
    plan = run(make_spec(), NOW, flat(8), sigs, make_state(3, pods=_placed(placement)))
    assert plan.drain == ("w1",)
