"""`SimCluster`: the in-memory `controller.cluster.Cluster` `forestall simulate` runs every policy on.

It is `emulation.lifecycle.Lifecycle` (nodes, pods, jittered lead times, whole-node billing, measured lead
times, the ReplicaSet's removal order) as it is: the simulator moves time with `advance(now)` before each
reconcile, reads `pods` to place streams, and counts the streams still on a pod in `removed` as cut (a removed
pod is deleted at once). This module only adds what the simulator asks of a pod beyond the model.

What it does not do: carry streams (`emulation.streams`), or differ from the demo's cluster in how nodes and
pods come and go (that is the point of one model).
"""

from __future__ import annotations

from controller import cluster
from emulation import lifecycle


class SimCluster(lifecycle.Lifecycle):
    """An in-memory cluster for one scale target, with GPU nodes, lead times and billing."""

    def draining(self, pod: lifecycle.Pod) -> bool:
        """Whether the controller marked `pod` for draining (the balancer sends it no new stream)."""
        return cluster.DRAIN_ANNOTATION in pod.annotations
