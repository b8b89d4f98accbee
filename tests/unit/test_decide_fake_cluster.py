"""`tests.fakes.cluster.FakeCluster` keeps the `Cluster` contract the controller's tests rely on, and applying a
plan with `controller.acting.apply_plan` to it removes exactly the pods `decide()` chose."""

from __future__ import annotations

import pytest

from controller import acting, cluster
from tests.fakes.cluster import FakeCluster
from tests.unit.test_decide import NOW, drained_at, flat, make_signals, make_spec, ready_pods, run


def test_calls_are_recorded_and_next_error_raises_once() -> None:
    fake = FakeCluster(cluster.ClusterState(spec_replicas=2, pods=ready_pods(2)))
    fake.next_error = RuntimeError("api down")
    with pytest.raises(RuntimeError, match="api down"):
        fake.set_replicas(3)
    assert fake.current.spec_replicas == 2  # the failed call changed nothing
    fake.set_replicas(3)
    fake.provision(4)
    fake.annotate("w0", {"a": "1"})
    fake.annotate("w0", {"a": None, "b": "2"})
    assert [name for name, _ in fake.calls] == [
        "set_replicas",
        "set_replicas",
        "provision",
        "annotate",
        "annotate",
    ]
    assert fake.names("set_replicas") == [(3,), (3,)]
    state = fake.state()
    assert state.spec_replicas == 3 and state.provisioned_gpus == 4
    assert [p.phase for p in state.pods].count("pending") == 1
    assert dict(state.pods[0].annotations) == {"b": "2"}
    with pytest.raises(KeyError, match="nope"):
        fake.annotate("nope", {})
    fake.reset()
    assert fake.calls == [] and fake.next_error is None and fake.state().spec_replicas == 2


def test_scale_down_removes_a_pending_pod_before_a_ready_one_whatever_its_deletion_cost() -> None:
    """The ReplicaSet ranks unassigned and not-Ready pods before pod-deletion-cost; cost-first would take w1."""
    pods = (*ready_pods(3), cluster.PodState(name="p", phase="pending", created_s=NOW))
    fake = FakeCluster(cluster.ClusterState(spec_replicas=4, pods=pods))
    fake.annotate("w1", {cluster.DELETION_COST_ANNOTATION: "-5"})
    fake.set_replicas(3)
    assert {p.name for p in fake.current.pods} == {"w0", "w1", "w2"}
    fake.set_replicas(2)
    assert {p.name for p in fake.current.pods} == {"w0", "w2"}


def test_applying_a_removal_plan_removes_exactly_the_chosen_pods() -> None:
    state = cluster.ClusterState(
        spec_replicas=4,
        pods=ready_pods(4, annotations={"w1": drained_at(NOW - 120), "w3": drained_at(NOW - 90)}),
    )
    fake = FakeCluster(state)
    plan = run(make_spec(), NOW, flat(12), make_signals({"w0": 6, "w1": 0, "w2": 6, "w3": 0}), state)
    assert set(plan.remove) == {"w1", "w3"}
    acting.apply_plan(fake, plan, fake.state(), now=NOW)
    assert {p.name for p in fake.current.pods} == {"w0", "w2"} and fake.current.spec_replicas == 2
    before = len(fake.calls)
    again = run(make_spec(), NOW, flat(12), make_signals({"w0": 6, "w2": 6}), fake.state())
    acting.apply_plan(fake, again, fake.state(), now=NOW)
    assert again.desired_replicas == 2 and [c for c, _ in fake.calls[before:] if c != "state"] == []
