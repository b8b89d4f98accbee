"""apply_plan: marks before scaling, only what differs, idempotent, and what it did as typed actions."""

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
    assert done == [
        acting.DoNotDisrupt("b", keep=True),
        acting.DeletionCost("a", -100),
        acting.Scale(previous=2, replicas=1),
    ]
    kinds = [call[0] for call in fake.calls]
    assert kinds.index("set_replicas") > kinds.index("annotate")


def test_applying_the_same_plan_twice_changes_nothing() -> None:
    fake = FakeCluster(_state(a={}, b={}))
    plan = decide.Plan(desired_replicas=2, drain=("a",), do_not_disrupt={"a": False, "b": True})
    assert acting.apply_plan(fake, plan, fake.state(), now=5.0) == [
        acting.Drain("a"),
        acting.DoNotDisrupt("b", keep=True),
    ]
    assert acting.apply_plan(fake, plan, fake.state(), now=6.0) == []


def test_undrain_and_release_do_not_disrupt() -> None:
    fake = FakeCluster(_state(a={cluster.DRAIN_ANNOTATION: "1", cluster.DO_NOT_DISRUPT_ANNOTATION: "true"}))
    plan = decide.Plan(desired_replicas=1, undrain=("a",), do_not_disrupt={"a": False})
    done = acting.apply_plan(fake, plan, fake.state(), now=5.0)
    assert done == [acting.Undrain("a"), acting.DoNotDisrupt("a", keep=False)]
    assert fake.state().pods[0].annotations == {}


def test_actions_are_typed_and_read_as_their_log_line() -> None:
    """Callers ask `isinstance(a, acting.Scale)`; `str()` is the log line the loop used to parse."""
    fake = FakeCluster(_state(a={}))
    plan = decide.Plan(desired_replicas=3, provision_gpus=8)
    done = acting.apply_plan(fake, plan, fake.state(), now=5.0)
    assert [type(a) for a in done] == [acting.Provision, acting.Scale]
    assert [a.kind for a in done] == [acting.ActionKind.PROVISION, acting.ActionKind.SCALE]
    assert [str(a) for a in done] == ["provision 8 GPUs", "scale 1 -> 3"]
    scale = done[-1]
    assert isinstance(scale, acting.Scale) and (scale.previous, scale.replicas) == (1, 3)


def test_capacity_weight_goes_on_the_pod_for_the_balancer_once() -> None:
    """The balancer's EndpointSlice watch reads `forestall.dev/capacity-weight`: decide() derives it from the
    pod's node GPU type, apply_plan writes it (once)."""
    fake = FakeCluster(_state(a={}, b={}))
    plan = decide.Plan(desired_replicas=2, capacity_weight={"a": 2.0})
    assert acting.apply_plan(fake, plan, fake.state(), now=5.0) == [acting.CapacityWeight("a", 2.0)]
    assert fake.state().pods[0].annotations == {"forestall.dev/capacity-weight": "2"}
    assert acting.apply_plan(fake, plan, fake.state(), now=6.0) == []
