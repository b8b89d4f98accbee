"""The cluster seam: what the controller reads from a cluster and the few things it does to one.

Three implementations share this protocol: `controller.kube.cluster` (a real Kubernetes API server, through
the official client), `emulation.sim` (an in-memory cluster with start-up delays, for `forestall simulate`)
and a local one that starts real worker processes (for `forestall demo`). Tests use `tests.fakes.cluster`.
`controller.pipeline` is the only caller: every reconcile reads `state()` and applies its plan through
`controller.acting`.

State the controller needs between reconciles lives in the cluster, not in the controller's memory: a pod's
drain mark carries the time it was set (`DRAIN_ANNOTATION`), so `decide()` stays a pure function and a new
leader picks up where the old one stopped.

What this module does not do: decide anything (`controller.decide`) or talk to any API (the implementations).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from contract import pod_annotations

DRAIN_ANNOTATION = pod_annotations.DRAIN
"""Set on a pod the controller wants to remove (the value is the drain's start time); see `contract.pod_annotations`."""

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
"""On scale-down the ReplicaSet removes the pod with the lowest cost first among pods alike in being scheduled,
phase and readiness: unscheduled, pending and not-Ready pods still go before it (Kubernetes >= 1.22;
`emulation.lifecycle` has the whole order)."""

DO_NOT_DISRUPT_ANNOTATION = "karpenter.sh/do-not-disrupt"
"""Karpenter does not consolidate or drift a node while a pod on it carries this set to "true"."""

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""Node label NVIDIA's GPU feature discovery sets to the GPU model (e.g. `NVIDIA-H100-80GB-HBM3`); matched
against `capacity.gpuTypes[].name`."""

PodPhase = Literal["pending", "starting", "ready", "terminating"]
"""`pending`: not scheduled (waiting for a node). `starting`: scheduled, not Ready (image pull, model load).
`ready`: serving. `terminating`: has a deletionTimestamp."""


@dataclass(frozen=True)
class PodState:
    """One worker pod of the scale target."""

    name: str
    phase: PodPhase
    created_s: float
    """Unix time the pod was created."""

    scheduled_s: float | None = None
    """Unix time the pod was bound to a node (PodScheduled condition)."""

    ready_s: float | None = None
    """Unix time the pod became Ready (Ready condition), None if not Ready."""

    node: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def drain_started_s(self) -> float | None:
        """When the controller marked this pod for draining, None when not marked."""
        raw = self.annotations.get(DRAIN_ANNOTATION)
        if raw is None:
            return None
        try:
            return float(raw)
        except ValueError:
            return None


@dataclass(frozen=True)
class NodeState:
    """One node that can run the target's pods."""

    name: str
    gpus: int
    ready: bool
    created_s: float
    ready_s: float | None = None
    gpu_product: str | None = None
    """The node's `GPU_PRODUCT_LABEL`, None when unlabelled."""


@dataclass(frozen=True)
class ClusterState:
    """A consistent snapshot of what `decide()` needs to know about the cluster."""

    spec_replicas: int
    """Replicas the scale target is set to now (its scale subresource's spec.replicas)."""

    pods: tuple[PodState, ...] = ()
    nodes: tuple[NodeState, ...] = ()
    provisioned_gpus: int = 0
    """GPUs the provisioner holds ahead of demand now (buffer, placeholders, provisioning requests)."""

    pending_gpus: int = 0
    """GPUs requested but not yet on Ready nodes."""

    measured_node_provisioning_s: float | None = None
    """Median measured node creation -> Ready, None until measured."""

    measured_pod_start_s: float | None = None
    """Median measured pod creation -> scheduled-and-running (excluding node wait), None until measured."""

    measured_model_load_s: float | None = None
    """Median measured container running -> Ready, None until measured."""

    lead_time_samples: int = 0
    """Observations behind the measured lead times (reported in status)."""

    deletion_cost_overwrites: Mapping[str, str] = field(default_factory=dict)
    """Pod -> the deletion cost found where the controller had written another (another controller manages
    it); empty when none, and always for clusters where nothing else writes pod annotations."""

    removal_order: Literal["deletion-cost", "highest-ordinal"] = "deletion-cost"
    """Which pods a scale-down removes: a ReplicaSet honours pod-deletion-cost (so any drained pod can go);
    a StatefulSet always removes its highest ordinals, so only those may be drained for removal."""

    @property
    def ready_replicas(self) -> int:
        return sum(1 for pod in self.pods if pod.phase == "ready")


class Cluster(Protocol):
    """What the controller can read from and do to a cluster, for one scale target."""

    def state(self) -> ClusterState:
        """Read a snapshot of the target, its pods, nodes and provisioned capacity."""
        ...

    def set_replicas(self, replicas: int) -> None:
        """Set the target's replicas through the scale subresource."""
        ...

    def provision(self, gpus: int) -> None:
        """Hold this many GPUs of node capacity ahead of demand (0 releases it), per the policy's provisioner."""
        ...

    def annotate(self, pod: str, annotations: Mapping[str, str | None]) -> None:
        """Merge-patch annotations on a pod; a None value removes that annotation."""
        ...
