"""Applying a `Plan` to a `Cluster`: the one place that turns a decision into cluster changes.

The order matters and is the same for every cluster (Kubernetes, simulated, local processes):

1. drain marks set and removed, so the balancers stop sending new streams to leaving pods first;
2. `karpenter.sh/do-not-disrupt` kept on pods carrying streams, so consolidation does not cut them;
3. deletion costs set on the pods to remove (lowest goes first), so the ReplicaSet removes exactly those;
   capacity weights (per GPU type) set, so the balancers weigh each pod by what it can carry;
4. provisioned GPUs, then replicas through the scale subresource, last, once the pods are marked.

Only what differs from the snapshot the plan was made from is written: applying the same plan twice changes
nothing, and a reconcile that decides nothing new makes no API calls.

What this module does not do: decide (`controller.decide`) or know which cluster it talks to.
"""

from __future__ import annotations

from contract import pod_annotations
from controller import cluster, decide


def apply_plan(
    c: cluster.Cluster, plan: decide.Plan, state: cluster.ClusterState, *, now: float
) -> list[str]:
    """Make `plan` true on `c`, given the `state` it was decided from; returns what was done, one line each."""
    done: list[str] = []
    pods = {p.name: p for p in state.pods}
    stamp = f"{now:.0f}"
    for name in plan.drain:
        if name in pods and pods[name].drain_started_s is None:
            c.annotate(name, {cluster.DRAIN_ANNOTATION: stamp})
            done.append(f"drain {name}")
    for name in plan.undrain:
        if name in pods and cluster.DRAIN_ANNOTATION in pods[name].annotations:
            c.annotate(name, {cluster.DRAIN_ANNOTATION: None})
            done.append(f"undrain {name}")
    for name, keep in plan.do_not_disrupt.items():
        if name not in pods:
            continue
        has = pods[name].annotations.get(cluster.DO_NOT_DISRUPT_ANNOTATION) == "true"
        if keep and not has:
            c.annotate(name, {cluster.DO_NOT_DISRUPT_ANNOTATION: "true"})
            done.append(f"do-not-disrupt {name}")
        elif not keep and has:
            c.annotate(name, {cluster.DO_NOT_DISRUPT_ANNOTATION: None})
            done.append(f"allow-disrupt {name}")
    for name, cost in plan.deletion_cost.items():
        if name in pods and pods[name].annotations.get(cluster.DELETION_COST_ANNOTATION) != str(cost):
            c.annotate(name, {cluster.DELETION_COST_ANNOTATION: str(cost)})
            done.append(f"deletion-cost {name}={cost}")
    for name, weight in plan.capacity_weight.items():
        if name in pods and pods[name].annotations.get(pod_annotations.CAPACITY_WEIGHT) != f"{weight:g}":
            c.annotate(name, {pod_annotations.CAPACITY_WEIGHT: f"{weight:g}"})
            done.append(f"capacity-weight {name}={weight:g}")
    if plan.provision_gpus != state.provisioned_gpus:
        c.provision(plan.provision_gpus)
        done.append(f"provision {plan.provision_gpus} GPUs")
    if plan.desired_replicas != state.spec_replicas:
        c.set_replicas(plan.desired_replicas)
        done.append(f"scale {state.spec_replicas} -> {plan.desired_replicas}")
    return done
