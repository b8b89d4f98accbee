"""A StatefulSet removes its highest ordinals on scale-down, so those are the pods drained."""

from __future__ import annotations

from controller import cluster
from tests.unit.test_decide import NOW, make_history, make_signals, make_spec, run


def sts_pods(n: int) -> tuple[cluster.PodState, ...]:
    return tuple(
        cluster.PodState(name=f"llm-{i}", phase="ready", created_s=NOW - 3600 + i, ready_s=NOW - 3000 + i)
        for i in range(n)
    )


def test_statefulset_drains_its_highest_ordinals_not_the_emptiest_pod() -> None:
    """Regression: the emptiest pod (llm-0) was drained, but the StatefulSet removed llm-3, mid-stream."""
    spec = make_spec(
        scaleDown={"maxPodsPerMinute": 2, "stabilizationWindowSeconds": 600, "drainTimeoutSeconds": 300}
    )
    sigs = make_signals({"llm-0": 0, "llm-1": 3, "llm-2": 4, "llm-3": 5})
    state = cluster.ClusterState(spec_replicas=4, pods=sts_pods(4), removal_order="highest-ordinal")
    plan = run(spec, NOW, make_history([10.0] * 20, forecast=10), sigs, state)
    assert plan.drain == ("llm-3", "llm-2")
    # the same pods behind a Deployment: the emptiest go first (pod-deletion-cost decides removal)
    plan = run(spec, NOW, make_history([10.0] * 20, forecast=10), sigs, cluster.ClusterState(4, sts_pods(4)))
    assert plan.drain[0] == "llm-0"
