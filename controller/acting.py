"""Applying a `Plan` to a `Cluster`: the one place that turns a decision into cluster changes.

The order matters and is the same for every cluster (Kubernetes, simulated, local processes):

1. drain marks set and removed, so the balancers stop sending new streams to leaving pods first;
2. `karpenter.sh/do-not-disrupt` kept on pods carrying streams, so consolidation does not cut them;
3. deletion costs set on the pods to remove (lowest goes first), so the ReplicaSet removes exactly those;
   capacity weights (per GPU type) set, so the balancers weigh each pod by what it can carry;
4. provisioned GPUs, then replicas through the scale subresource, last, once the pods are marked.

Only what differs from the snapshot the plan was made from is written: applying the same plan twice changes
nothing, and a reconcile that decides nothing new makes no API calls. What was written comes back as typed
`Action`s (one dataclass per kind, `str()` gives the log line), so callers ask `isinstance(a, Scale)` instead
of parsing text.

What this module does not do: decide (`controller.decide`) or know which cluster it talks to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from contract import pod_annotations
from controller import cluster, decide


class ActionKind(enum.StrEnum):
    """What an `Action` changed; the value is the verb of its log line."""

    DRAIN = "drain"
    UNDRAIN = "undrain"
    DO_NOT_DISRUPT = "do-not-disrupt"
    ALLOW_DISRUPT = "allow-disrupt"
    DELETION_COST = "deletion-cost"
    CAPACITY_WEIGHT = "capacity-weight"
    PROVISION = "provision"
    SCALE = "scale"


@dataclass(frozen=True)
class Drain:
    """The drain mark (`DRAIN_ANNOTATION`, stamped with the time) was set on `pod`."""

    pod: str
    kind: ActionKind = ActionKind.DRAIN

    def __str__(self) -> str:
        return f"drain {self.pod}"


@dataclass(frozen=True)
class Undrain:
    """The drain mark was removed from `pod`: it serves new streams again."""

    pod: str
    kind: ActionKind = ActionKind.UNDRAIN

    def __str__(self) -> str:
        return f"undrain {self.pod}"


@dataclass(frozen=True)
class DoNotDisrupt:
    """`karpenter.sh/do-not-disrupt` was set (`keep`) or removed on `pod`."""

    pod: str
    keep: bool

    @property
    def kind(self) -> ActionKind:
        return ActionKind.DO_NOT_DISRUPT if self.keep else ActionKind.ALLOW_DISRUPT

    def __str__(self) -> str:
        return f"{self.kind} {self.pod}"


@dataclass(frozen=True)
class DeletionCost:
    """`controller.kubernetes.io/pod-deletion-cost` was set to `cost` on `pod`."""

    pod: str
    cost: int
    kind: ActionKind = ActionKind.DELETION_COST

    def __str__(self) -> str:
        return f"deletion-cost {self.pod}={self.cost}"


@dataclass(frozen=True)
class CapacityWeight:
    """`forestall.dev/capacity-weight` was set to `weight` on `pod` (from its node's GPU type), so the
    balancers weigh its load by what it can serve."""

    pod: str
    weight: float
    kind: ActionKind = ActionKind.CAPACITY_WEIGHT

    def __str__(self) -> str:
        return f"capacity-weight {self.pod}={self.weight:g}"


@dataclass(frozen=True)
class Provision:
    """The provisioner was asked to hold `gpus` GPUs ahead of demand (it held `previous`)."""

    gpus: int
    previous: int
    kind: ActionKind = ActionKind.PROVISION

    def __str__(self) -> str:
        return f"provision {self.gpus} GPUs"


@dataclass(frozen=True)
class Scale:
    """The target's replicas were set from `previous` to `replicas` through the scale subresource."""

    previous: int
    replicas: int
    kind: ActionKind = ActionKind.SCALE

    def __str__(self) -> str:
        return f"scale {self.previous} -> {self.replicas}"


Action = Drain | Undrain | DoNotDisrupt | DeletionCost | CapacityWeight | Provision | Scale
"""One change `apply_plan` made, in the order it made them."""


def apply_plan(
    c: cluster.Cluster, plan: decide.Plan, state: cluster.ClusterState, *, now: float
) -> list[Action]:
    """Make `plan` true on `c`, given the `state` it was decided from; returns what was done, in order."""
    done: list[Action] = []
    stamp = f"{now:.0f}"
    pods = (
        {p.name: p for p in state.pods}
        if plan.drain or plan.undrain or plan.deletion_cost or plan.capacity_weight
        else {}
    )
    for name in plan.drain:
        if name in pods and pods[name].drain_started_s is None:
            c.annotate(name, {cluster.DRAIN_ANNOTATION: stamp})
            done.append(Drain(name))
    for name in plan.undrain:
        if name in pods and cluster.DRAIN_ANNOTATION in pods[name].annotations:
            c.annotate(name, {cluster.DRAIN_ANNOTATION: None})
            done.append(Undrain(name))
    marks = plan.do_not_disrupt
    if marks:  # one pass over the pods, not a lookup per mark: this runs every reconcile for every pod
        for pod in state.pods:
            keep = marks.get(pod.name)
            if keep is None:
                continue
            if keep != (pod.annotations.get(cluster.DO_NOT_DISRUPT_ANNOTATION) == "true"):
                c.annotate(pod.name, {cluster.DO_NOT_DISRUPT_ANNOTATION: "true" if keep else None})
                done.append(DoNotDisrupt(pod.name, keep=keep))
    for name, cost in plan.deletion_cost.items():
        if name in pods and pods[name].annotations.get(cluster.DELETION_COST_ANNOTATION) != str(cost):
            c.annotate(name, {cluster.DELETION_COST_ANNOTATION: str(cost)})
            done.append(DeletionCost(name, cost))
    for name, weight in plan.capacity_weight.items():
        if name in pods and pods[name].annotations.get(pod_annotations.CAPACITY_WEIGHT) != f"{weight:g}":
            c.annotate(name, {pod_annotations.CAPACITY_WEIGHT: f"{weight:g}"})
            done.append(CapacityWeight(name, weight))
    if plan.provision_gpus != state.provisioned_gpus:
        c.provision(plan.provision_gpus)
        done.append(Provision(plan.provision_gpus, previous=state.provisioned_gpus))
    if plan.desired_replicas != state.spec_replicas:
        c.set_replicas(plan.desired_replicas)
        done.append(Scale(state.spec_replicas, plan.desired_replicas))
    return done
