"""The one node/pod model: the ReplicaSet controller's removal order, rule by rule, and holding a pod short of Ready.

Each order test pits two pods where the rule under test and the rules after it disagree (most often a lower
pod-deletion-cost on the pod that must stay), so an implementation that ranks them in another order fails.
The rules are Kubernetes's `ActivePodsWithRanks.Less` (pkg/controller/controller_utils.go).
"""

from __future__ import annotations

import pytest

from controller import cluster
from emulation import lifecycle
from tests.fakes import specs

NOW = 1_700_000_000.0


def pod(name: str, **fields: object) -> lifecycle.RemovalCandidate:
    base: dict[str, object] = {
        "node": "n1",
        "phase": "Running",
        "ready_s": NOW - 1000.0,
        "created_s": NOW - 2000.0,
        "deletion_cost": 0,
    }
    base.update(fields)
    return lifecycle.RemovalCandidate(name=name, **base)  # type: ignore[arg-type]


def first(*pods: lifecycle.RemovalCandidate) -> str:
    """The name the ReplicaSet deletes first among `pods`, checked in both input orders."""
    forward = lifecycle.pods_to_delete(pods, 1, now_s=NOW)[0].name
    backward = lifecycle.pods_to_delete(pods[::-1], 1, now_s=NOW)[0].name
    assert forward == backward
    return forward


def test_unassigned_goes_before_assigned_even_with_a_higher_cost() -> None:
    assert (
        first(pod("bound", deletion_cost=-100), pod("free", node=None, phase="Pending", ready_s=None))
        == "free"
    )


def test_pending_goes_before_unknown_before_running() -> None:
    running = pod("running", deletion_cost=-100, ready_s=None)
    unknown = pod("unknown", phase="Unknown", ready_s=None, deletion_cost=-50)
    pending = pod("pending", phase="Pending", ready_s=None)
    assert first(running, unknown) == "unknown"
    assert first(unknown, pending) == "pending"


def test_not_ready_goes_before_ready_even_with_a_higher_cost() -> None:
    assert first(pod("ready", deletion_cost=-100), pod("loading", ready_s=None)) == "loading"


def test_lower_deletion_cost_goes_first_among_ready_pods() -> None:
    # The cheap pod is older, alone on its node and ready longer: every later rule would keep it.
    cheap = pod("cheap", deletion_cost=-5, node="alone", ready_s=NOW - 10_000.0, created_s=NOW - 20_000.0)
    crowded = [pod(f"w{i}", node="busy", ready_s=NOW - 10.0, created_s=NOW - 20.0) for i in range(3)]
    assert first(cheap, *crowded) == "cheap"


def test_more_pods_on_the_same_node_goes_first() -> None:
    lone = pod("lone", node="n2", ready_s=NOW - 5.0, created_s=NOW - 6.0)  # newest and most recently ready
    packed = [pod(f"p{i}", node="n1") for i in range(2)]
    assert lifecycle.pods_to_delete([lone, *packed], 1, now_s=NOW)[0].name in {"p0", "p1"}


def test_ready_more_recently_goes_first_in_log2_buckets() -> None:
    recent = pod("z-recent", ready_s=NOW - 10.0, created_s=NOW - 5000.0)
    old = pod("a-old", ready_s=NOW - 1000.0, created_s=NOW - 100.0)  # newer pod, but ready much longer
    assert first(recent, old) == "z-recent"
    # 100 s and 120 s ago fall in one log2 bucket of nanoseconds: the UID (here the name) decides, not age.
    assert first(pod("b", ready_s=NOW - 100.0), pod("a", ready_s=NOW - 120.0)) == "a"


def test_more_restarts_then_newer_goes_first() -> None:
    assert first(pod("calm", created_s=NOW - 10.0), pod("flaky", restarts=3)) == "flaky"
    assert first(pod("young", created_s=NOW - 10.0), pod("old", created_s=NOW - 10_000.0)) == "young"


def test_all_or_none_need_no_order() -> None:
    pods = [pod("a"), pod("b")]
    assert lifecycle.pods_to_delete(pods, 0, now_s=NOW) == []
    assert [p.name for p in lifecycle.pods_to_delete(pods, 5, now_s=NOW)] == ["a", "b"]


@pytest.mark.parametrize(("raw", "cost"), [("-7", -7), ("x", 0), (str(2**31), 0), (None, 0)])
def test_deletion_cost_reads_like_kubernetes(raw: str | None, cost: int) -> None:
    annotations = {} if raw is None else {cluster.DELETION_COST_ANNOTATION: raw}
    assert lifecycle.deletion_cost(annotations) == cost


def test_the_model_removes_a_starting_pod_before_a_cheaper_ready_one() -> None:
    model = lifecycle.Lifecycle(specs.spec(gpus_per_node=8), seed=1, start_s=NOW, node_release_after_s=60)
    model.bootstrap(2)
    model.set_replicas(3)  # fits on the node: bound and starting at once
    model.annotate("worker-0", {cluster.DELETION_COST_ANNOTATION: "-10"})
    model.set_replicas(2)
    assert sorted(p.name for p in model.state().pods) == ["worker-0", "worker-1"]
    assert [pid for pid, _ in model.removed] == [2]


def test_a_held_pod_is_ready_only_when_released_and_not_before_its_planned_time() -> None:
    model = lifecycle.Lifecycle(specs.spec(gpus_per_node=8), seed=1, start_s=NOW, node_release_after_s=60)
    model.bootstrap(1)
    model.set_replicas(2)
    new = model.pods[1]
    assert new.ready_s is not None
    model.hold_ready(new)
    model.advance(new.ready_s + 5)
    assert new.phase(model.now_s) == "starting" and model.state().ready_replicas == 1
    model.release_ready(new, new.ready_s + 5)
    assert new.ready_s == pytest.approx(model.now_s) and model.state().ready_replicas == 2
    early = model.pods[0]
    model.hold_ready(early)
    model.release_ready(early, NOW - 3000)  # answered before its planned time: the plan stands
    assert early.ready_s == NOW - 1.0
