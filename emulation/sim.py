"""`SimCluster`: the in-memory `controller.cluster.Cluster` `forestall simulate` runs every policy on.

It is `emulation.lifecycle.Lifecycle` (nodes, pods, jittered lead times, whole-node billing, measured lead
times, the ReplicaSet's removal order) as it is: the simulator moves time with `advance(now)` before each
reconcile, reads `pods` to place streams, and counts the streams still on a pod in `removed` as cut (a removed
pod is deleted at once). This module only adds what the simulator asks of a pod beyond the model.

With `capacity.gpuTypes` the pool is mixed: new nodes take the listed GPU types in turn, labelled like GPU
feature discovery labels them, and each pod carries its node type's streams per replica (`pod_slots`).

What it does not do: carry streams (`emulation.streams`), or differ from the demo's cluster in how nodes and
pods come and go (that is the point of one model).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from controller import cluster
from emulation import lifecycle


class SimCluster(lifecycle.Lifecycle):
    """An in-memory cluster for one scale target, with GPU nodes, lead times and billing."""

    def draining(self, pod: lifecycle.Pod) -> bool:
        """Whether the controller marked `pod` for draining (the balancer sends it no new stream)."""
        return cluster.DRAIN_ANNOTATION in pod.annotations

    def pod_slots(self) -> npt.NDArray[np.int64]:
        """Stream slots of every pod id so far: its node's GPU type's streams per replica, else the policy's
        (a mixed pool, `capacity.gpuTypes`)."""
        base = self.spec.capacity.streams_per_replica
        per_type = {g.name: g.streams_per_replica for g in self.spec.capacity.gpu_types}
        out = np.full(max(self.next_pod_id, 1), base, dtype=np.int64)
        for p in self.pods.values():
            if p.node is not None:
                node = self.nodes.get(p.node)
                if node is not None and node.gpu_product is not None:
                    out[p.id] = per_type.get(node.gpu_product, base)
        return out
