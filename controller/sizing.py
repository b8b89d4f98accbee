"""Sizing with the bill in view: GPU nodes, not pods, are what a policy pays for.

A GPU node is billed from its request to its release, whatever share of its GPUs the target's pods use. The
rules, both pure functions of the cluster snapshot that `decide()` calls:

- **Scale-down empties whole nodes.** Draining a pod from a node that stays saves nothing and costs headroom,
  so pods are drained only from nodes that can be emptied: the emptiest nodes first, each only when the
  surplus covers all of its serving pods (`drain_whole_nodes`). Pods not yet on a node go first (they may be
  holding a node request open). Within a node, fewest streams first, as before.
- **A replica that opens a node costs a node.** When the target exceeds what the target's nodes (those
  running its pods, and those on their way) hold by a sliver, within `NODE_TOLERANCE`, it is held at what
  they hold (`within_node_tolerance`): the forecast's upper quantile already carries a margin. Filling the
  free GPUs of paid nodes with warm idle pods was measured too and not kept: on NASA (peak 400, two days) it
  cost 2% more GPU-hours for no SLO gain.
- **Capacity by GPU type.** With `capacity.gpuTypes`, a pod counts for the streams per replica of the GPU
  type its node carries (label `nvidia.com/gpu.product`), in units of `capacity.streamsPerReplica`
  (`replica_weights`); pods on unlisted types, and pods not yet on a node (their type is not known until the
  scheduler places them), count as one. The same ratio goes to the balancer as the pod's
  `forestall.dev/capacity-weight` annotation (`weight_annotations`), which its EndpointSlice watch already
  reads, so least-loaded picking is by streams over each pod's own capacity.

What this module does not do: forecast, read signals, or choose the serving target (`controller.decide`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from contract import pod_annotations
from controller import cluster, policy

NODE_TOLERANCE = 0.25
"""Scale-up does not open a node for a target that exceeds what the target's nodes hold by at most this
fraction of it (and at most a node's replicas less one): the forecast's upper quantile already carries a
margin, and a node opened for a sliver is billed in full for at least a lead time. HPA's tolerance, applied to
nodes. In `forestall simulate` (NASA, peak 400, first two days, q0.95) it took GPU-hours from 1.22x to 1.11x
`oracle-lead` at the same SLO attainment (99.97%); a fixed half node did worse (1.18x, 99.89%), up to 7/8 of
a node too (1.14x, 99.64%)."""


def within_node_tolerance(spec: policy.ScalingPolicySpec, state: cluster.ClusterState, target: int) -> int:
    """`target`, or the replicas the target's nodes hold when it exceeds them within `NODE_TOLERANCE`.

    The target's nodes are those running one of its pods and those not Ready yet (on their way, most likely
    for its pending pods). Without nodes in the snapshot the target is returned as is.
    """
    if not state.nodes:
        return target
    gpr = spec.capacity.gpus_per_replica
    hosting = {p.node for p in state.pods if p.node is not None and p.phase != "terminating"}
    fit = sum(n.gpus // gpr for n in state.nodes if n.name in hosting or not n.ready)
    per_node = max(1, spec.capacity.gpus_per_node // gpr)
    slack = min(per_node - 1, int(fit * NODE_TOLERANCE))
    if fit < target <= fit + slack:
        return fit
    return target


def replica_weights(spec: policy.ScalingPolicySpec, state: cluster.ClusterState) -> dict[str, float]:
    """Pod -> its capacity in replicas of `streamsPerReplica`, for pods on a node of a listed GPU type.

    Pods absent from the result count as one. Empty without `capacity.gpuTypes`.
    """
    types = {g.name: g.streams_per_replica for g in spec.capacity.gpu_types}
    if not types:
        return {}
    base = spec.capacity.streams_per_replica
    product = {n.name: n.gpu_product for n in state.nodes}
    out: dict[str, float] = {}
    for p in state.pods:
        spr = types.get(product.get(p.node) or "") if p.node is not None else None
        if spr is not None and spr != base:
            out[p.name] = spr / base
    return out


def weight_annotations(
    spec: policy.ScalingPolicySpec, live: Sequence[cluster.PodState], weights: Mapping[str, float]
) -> dict[str, float]:
    """Pod -> capacity weight to write, where the pod's annotation differs (nothing without gpuTypes)."""
    if not spec.capacity.gpu_types:
        return {}
    out: dict[str, float] = {}
    for p in live:
        want = weights.get(p.name, 1.0)
        raw = p.annotations.get(pod_annotations.CAPACITY_WEIGHT)
        try:
            have = float(raw) if raw is not None else 1.0
        except ValueError:
            have = -1.0  # unreadable: rewrite it
        if abs(have - want) > 1e-6 or (raw is not None and have < 0):
            out[p.name] = want
    return out


def drain_whole_nodes(
    serving: Sequence[cluster.PodState],
    *,
    excess: float,
    order: Callable[[cluster.PodState], Any],
    weight: Callable[[cluster.PodState], float] = lambda _p: 1.0,
    node_rank: Mapping[str, Any] | None = None,
    known_nodes: Collection[str] | None = None,
    whole_nodes: bool = True,
) -> list[cluster.PodState]:
    """Pods to drain so that whole nodes empty: unplaced pods, then every pod of the emptiest nodes.

    Args:
        serving: pods serving now (not draining, not terminating).
        excess: replicas surplus to the stabilized need (in units of `streamsPerReplica`).
        order: sort key within a node (and among unplaced pods): the cheapest pod to lose first.
        weight: a pod's capacity in those units (`replica_weights`; one by default).
        node_rank: optional extra sort key per node name (or pod name, for a pod on an unknown node), after
            the serving-pod count (e.g. streams on it).
        known_nodes: the GPU nodes the snapshot lists. A pod on a node outside them (one the controller
            cannot see, or a test's bare name) is its own group: without the node's GPUs there is no whole
            node to empty, and pod by pod is the best there is. None: every node counts.
        whole_nodes: False (`scaleDown.wholeNodes`, nodes shared with other workloads): the emptiest nodes'
            pods are taken one by one as far as `excess` goes, without waiting to empty a node.

    A node is taken only when `excess` covers all its serving pods; its pods are then listed in `order`. The
    caller marks as many of them as its rate limit allows (the next reconcile continues on the same node,
    which is still the emptiest).
    """
    if excess <= 0:
        return []
    eps = 1e-9
    chosen: list[cluster.PodState] = []
    left = excess
    for p in sorted((p for p in serving if p.node is None), key=order):
        if weight(p) > left + eps:
            break
        chosen.append(p)
        left -= weight(p)
    by_node: dict[str, list[cluster.PodState]] = {}
    for p in serving:
        if p.node is not None:
            key = p.node if known_nodes is None or p.node in known_nodes else f"pod/{p.name}"
            by_node.setdefault(key, []).append(p)
    ranked = sorted(by_node.items(), key=lambda kv: (len(kv[1]), (node_rank or {}).get(kv[0], 0), kv[0]))
    for _, pods in ranked:
        total = sum(weight(p) for p in pods)
        if total > left + eps:
            if whole_nodes:
                break
            for p in sorted(pods, key=order):  # a shared node: as many of its pods as the surplus covers
                if weight(p) > left + eps:
                    break
                chosen.append(p)
                left -= weight(p)
            break
        chosen += sorted(pods, key=order)
        left -= total
    return chosen
