"""apply_plan: marks before scaling, only what differs, idempotent."""

from __future__ import annotations

from controller import acting, cluster, decide
from tests.fakes.cluster import FakeCluster


def _state(**annotations: dict[str, str]) -> cluster.ClusterState:
    pods = tuple(
        cluster.PodState(name=name, phase="ready", created_s=0.0, annotations=ann)
        for name, ann in annotations.items()
    )
    return cluster.ClusterState(spec_replicas=len(pods), pods=pods)


def test_marks_pods_before_scaling_down() -> None:
    fake = FakeCluster(_state(a={cluster.DRAIN_ANNOTATION: "10"}, b={}))
    plan = decide.Plan(
        desired_replicas=1, remove=("a",), deletion_cost={"a": -100}, do_not_disrupt={"b": True}
    )
    done = acting.apply_plan(fake, plan, fake.state(), now=100.0)
    assert done == ["do-not-disrupt b", "deletion-cost a=-100", "scale 2 -> 1"]
    kinds = [call[0] for call in fake.calls]
    assert kinds.index("set_replicas") > kinds.index("annotate")


def test_applying_the_same_plan_twice_changes_nothing() -> None:
    fake = FakeCluster(_state(a={}, b={}))
    plan = decide.Plan(desired_replicas=2, drain=("a",), do_not_disrupt={"a": False, "b": True})
    assert acting.apply_plan(fake, plan, fake.state(), now=5.0) == ["drain a", "do-not-disrupt b"]
    assert acting.apply_plan(fake, plan, fake.state(), now=6.0) == []


def test_undrain_and_release_do_not_disrupt() -> None:
    fake = FakeCluster(_state(a={cluster.DRAIN_ANNOTATION: "1", cluster.DO_NOT_DISRUPT_ANNOTATION: "true"}))
    plan = decide.Plan(desired_replicas=1, undrain=("a",), do_not_disrupt={"a": False})
    assert acting.apply_plan(fake, plan, fake.state(), now=5.0) == ["undrain a", "allow-disrupt a"]
    assert fake.state().pods[0].annotations == {}


def test_capacity_weight_goes_on_the_pod_for_the_balancer_once() -> None:
    """The balancer's EndpointSlice watch reads `forestall.dev/capacity-weight`: decide() derives it from the
    pod's node GPU type, apply_plan writes it (once)."""
    fake = FakeCluster(_state(a={}, b={}))
    plan = decide.Plan(desired_replicas=2, capacity_weight={"a": 2.0})
    assert acting.apply_plan(fake, plan, fake.state(), now=5.0) == ["capacity-weight a=2"]
    assert fake.state().pods[0].annotations == {"forestall.dev/capacity-weight": "2"}
    assert acting.apply_plan(fake, plan, fake.state(), now=6.0) == []
