"""`SimCluster`: an in-memory `controller.cluster.Cluster` with GPU nodes and start-up delays, for `forestall simulate`.

It models what makes GPU capacity slow, and nothing else:

- a node is requested when pods are pending that no Ready or coming node can hold, or when the provisioner is
  asked to hold GPUs ahead (`provision`); it is Ready `node_provisioning_s` later (Karpenter and
  cluster-autoscaler both provision for pending pods; a capacity buffer or placeholder pods make them
  provision for the buffer too);
- a pod is bound to the fullest Ready node with room (GPU clusters bin-pack), its container runs `pod_start_s`
  after that and it is Ready `model_load_s` later;
- a node with no pods that the pods and the buffer do not need is released after `node_release_after_s`
  (Karpenter's `consolidateAfter`, cluster-autoscaler's `scale-down-unneeded-time`), and is billed from its
  request to its release;
- `set_replicas` below the current count removes pods in the ReplicaSet's order (unscheduled, then not Ready,
  then lowest `pod-deletion-cost`, then most recently Ready, then newest), so a plan that sets deletion cost
  on the pods it names gets exactly those removed.

Every delay is the policy's lead time times a seeded uniform jitter (±`jitter`), so runs are repeatable.
Time moves only through `advance(now)`; the simulator calls it before each reconcile. A removed pod is
deleted at once; the simulator counts the streams still on it as cut (`removed` lists them).

With `capacity.gpuTypes` the pool is mixed: new nodes take the listed GPU types in turn (as a NodePool
offering several instance types gives when one runs short), labelled like GPU feature discovery labels them,
and each pod carries its node type's streams per replica (`pod_slots`).

What it does not do: carry streams (the simulator does), model preemption, zones, or image caches.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller import cluster, policy

JITTER = 0.2
"""Each delay is its mean times a uniform factor in [1 - JITTER, 1 + JITTER]."""

MEASURED_SAMPLES = 20
"""Lead times reported as measured are the median of this many recent observations."""


@dataclass
class SimPod:
    id: int
    name: str
    created_s: float
    node: str | None = None
    scheduled_s: float | None = None
    running_s: float | None = None
    ready_s: float | None = None
    """Planned time the pod becomes Ready (set when it is bound to a node)."""
    annotations: dict[str, str] = field(default_factory=dict)
    snapshot: cluster.PodState | None = None
    snapshot_phase: str = ""

    def phase(self, now: float) -> cluster.PodPhase:
        if self.scheduled_s is None:
            return "pending"
        if self.ready_s is not None and self.ready_s <= now:
            return "ready"
        return "starting"


@dataclass
class SimNode:
    name: str
    gpus: int
    created_s: float
    ready_s: float
    used_gpus: int = 0
    unneeded_since_s: float | None = None
    gpu_product: str | None = None


class SimCluster:
    """An in-memory cluster for one scale target, with GPU nodes, lead times and billing."""

    def __init__(
        self,
        spec: policy.ScalingPolicySpec,
        *,
        seed: int,
        start_s: float,
        node_release_after_s: float,
        instant_nodes: bool = False,
        jitter: float = JITTER,
    ) -> None:
        self.spec = spec
        self.node_release_after_s = node_release_after_s
        self.instant_nodes = instant_nodes
        self.jitter = jitter
        self.now_s = start_s
        self.rng = random.Random(seed)
        self.gpus_per_replica = spec.capacity.gpus_per_replica
        self.gpus_per_node = max(spec.capacity.gpus_per_node, self.gpus_per_replica)
        self.spec_replicas = 0
        self.provisioned_gpus = 0
        self.pods: dict[int, SimPod] = {}
        self.nodes: dict[str, SimNode] = {}
        self.next_pod_id = 0
        self._next_node = 0
        self.removed: list[tuple[int, float]] = []
        """(pod id, time) of pods removed since the simulator last looked; it empties this list."""
        self.gpu_seconds = 0.0
        """GPU-seconds billed so far: every node's GPUs from its request to its release (or now)."""
        self._billed_to_s = start_s
        self.scale_events = 0
        """Changes of the target's replicas (set_replicas calls that changed the count)."""
        self._measured: dict[str, deque[float]] = {
            k: deque(maxlen=MEASURED_SAMPLES) for k in ("node", "pod", "load")
        }
        self._median: dict[str, float | None] = {"node": None, "pod": None, "load": None}
        self.gpu_types = [g.name for g in spec.capacity.gpu_types]
        """A mixed pool: each new node gets the next of these GPU types in turn (none: one unlabelled type)."""
        self._slots = {g.name: g.streams_per_replica for g in spec.capacity.gpu_types}
        self._node_version = 0
        self._nodes_cache: tuple[tuple[int, int], tuple[cluster.NodeState, ...]] | None = None

    # --- the Cluster protocol -------------------------------------------------------------------------------

    def state(self) -> cluster.ClusterState:
        now = self.now_s
        pods = []
        for pod in self.pods.values():
            phase = pod.phase(now)
            if pod.snapshot is None or pod.snapshot_phase != phase:
                pod.snapshot = cluster.PodState(
                    name=pod.name,
                    phase=phase,
                    created_s=pod.created_s,
                    scheduled_s=pod.scheduled_s,
                    ready_s=pod.ready_s if phase == "ready" else None,
                    node=pod.node,
                    annotations=dict(pod.annotations),
                )
                pod.snapshot_phase = phase
            pods.append(pod.snapshot)
        ready_now = sum(1 for n in self.nodes.values() if n.ready_s <= now)
        if self._nodes_cache is not None and self._nodes_cache[0] == (self._node_version, ready_now):
            nodes = self._nodes_cache[1]
        else:
            nodes = self._node_states(now)
            self._nodes_cache = ((self._node_version, ready_now), nodes)
        return cluster.ClusterState(
            spec_replicas=self.spec_replicas,
            pods=tuple(pods),
            nodes=nodes,
            provisioned_gpus=self.provisioned_gpus,
            pending_gpus=sum(n.gpus for n in self.nodes.values() if n.ready_s > now),
            measured_node_provisioning_s=self._median["node"],
            measured_pod_start_s=self._median["pod"],
            measured_model_load_s=self._median["load"],
        )

    def _node_states(self, now: float) -> tuple[cluster.NodeState, ...]:
        return tuple(
            cluster.NodeState(
                name=n.name,
                gpus=n.gpus,
                ready=n.ready_s <= now,
                created_s=n.created_s,
                ready_s=n.ready_s if n.ready_s <= now else None,
                gpu_product=n.gpu_product,
            )
            for n in self.nodes.values()
        )

    def set_replicas(self, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if replicas != self.spec_replicas:
            self.scale_events += 1
        self.spec_replicas = replicas
        live = len(self.pods)
        if replicas > live:
            for _ in range(replicas - live):
                pid = self.next_pod_id
                self.next_pod_id += 1
                self.pods[pid] = SimPod(id=pid, name=f"worker-{pid}", created_s=self.now_s)
            self._schedule(self.now_s)
            self._request_nodes()
        elif replicas < live:
            now = self.now_s
            ranked = sorted(self.pods.values(), key=lambda p: self._deletion_rank(p, now))
            for pod in ranked[: live - replicas]:
                self._delete(pod)
            self._release_nodes(now)  # nodes left empty are unneeded from now

    def provision(self, gpus: int) -> None:
        self.provisioned_gpus = max(0, int(gpus))
        self._request_nodes()

    def annotate(self, pod: str, annotations: Mapping[str, str | None]) -> None:
        target = self._by_name(pod)
        if target is None:
            return
        for key, value in annotations.items():
            if value is None:
                target.annotations.pop(key, None)
            else:
                target.annotations[key] = value
        target.snapshot = None

    # --- simulation -------------------------------------------------------------------------------------------

    def bootstrap(self, replicas: int) -> None:
        """Start with `replicas` Ready pods on Ready nodes (the steady state before the trace begins)."""
        now = self.now_s
        self.spec_replicas = replicas
        for _ in range(replicas):
            pid = self.next_pod_id
            self.next_pod_id += 1
            self.pods[pid] = SimPod(id=pid, name=f"worker-{pid}", created_s=now - 3600.0)
        nodes_needed = math.ceil(replicas * self.gpus_per_replica / self.gpus_per_node)
        for _ in range(nodes_needed):
            self._add_node(now, ready_s=now)
        for pod in self.pods.values():
            node = self._fit(now)
            assert node is not None
            self._bind(pod, node, now)
            pod.scheduled_s = pod.running_s = pod.ready_s = now - 1.0

    def advance(self, now: float) -> None:
        """Move time to `now`: nodes come up and take pending pods, unneeded nodes go, billing accrues."""
        self._bill(now)
        for node in sorted(self.nodes.values(), key=lambda n: n.ready_s):
            if self.now_s < node.ready_s <= now:
                self._schedule(node.ready_s)
        self.now_s = now
        self._schedule(now)
        self._request_nodes()
        self._release_nodes(now)

    def ready_between(self, t0: float, t1: float) -> list[tuple[int, float]]:
        """(pod id, ready time) of pods that become Ready in [t0, t1), as planned now."""
        return [
            (p.id, p.ready_s) for p in self.pods.values() if p.ready_s is not None and t0 <= p.ready_s < t1
        ]

    def node_gpus(self) -> int:
        """GPUs on nodes requested and not released (what is being billed now)."""
        return sum(n.gpus for n in self.nodes.values())

    def pod_slots(self) -> npt.NDArray[np.int64]:
        """Stream slots of every pod id so far: its node's GPU type's streams per replica, else the policy's."""
        base = self.spec.capacity.streams_per_replica
        out = np.full(max(self.next_pod_id, 1), base, dtype=np.int64)
        for p in self.pods.values():
            if p.node is not None:
                node = self.nodes.get(p.node)
                if node is not None and node.gpu_product is not None:
                    out[p.id] = self._slots.get(node.gpu_product, base)
        return out

    def draining(self, pod: SimPod) -> bool:
        return cluster.DRAIN_ANNOTATION in pod.annotations

    # --- internals --------------------------------------------------------------------------------------------

    def _delay(self, mean_s: float) -> float:
        return mean_s * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def _bill(self, now: float) -> None:
        if now > self._billed_to_s:
            self.gpu_seconds += self.node_gpus() * (now - self._billed_to_s)
            self._billed_to_s = now

    def _deletion_rank(self, pod: SimPod, now: float) -> tuple[int, int, int, int, float, float]:
        """The ReplicaSet's scale-down order (kube controller_utils ActivePodsWithRanks): lowest first."""
        assigned = 0 if pod.node is None else 1
        running = 1 if pod.running_s is not None and pod.running_s <= now else 0
        ready = 1 if pod.phase(now) == "ready" else 0
        try:
            cost = int(pod.annotations.get(cluster.DELETION_COST_ANNOTATION, "0"))
        except ValueError:
            cost = 0
        recently_ready = -(pod.ready_s or 0.0) if ready else 0.0
        return (assigned, running, ready, cost, recently_ready, -pod.created_s)

    def _delete(self, pod: SimPod) -> None:
        del self.pods[pod.id]
        if pod.node is not None and pod.node in self.nodes:
            self.nodes[pod.node].used_gpus -= self.gpus_per_replica
        self.removed.append((pod.id, self.now_s))

    def pod_named(self, name: str) -> SimPod | None:
        """The pod called `name`, or None when there is none (removed, or never existed)."""
        return self._by_name(name)

    def _by_name(self, name: str) -> SimPod | None:
        if name.startswith("worker-"):
            try:
                return self.pods.get(int(name[7:]))
            except ValueError:
                return None
        return None

    def _add_node(self, now: float, *, ready_s: float | None = None) -> SimNode:
        name = f"gpu-node-{self._next_node}"
        self._next_node += 1
        if ready_s is None:
            delay = 0.0 if self.instant_nodes else self._delay(self.spec.lead_time.node_provisioning_s)
            ready_s = now + delay
            self._observe("node", delay)
        product = self.gpu_types[(self._next_node - 1) % len(self.gpu_types)] if self.gpu_types else None
        node = SimNode(
            name=name, gpus=self.gpus_per_node, created_s=now, ready_s=ready_s, gpu_product=product
        )
        self.nodes[name] = node
        self._node_version += 1
        return node

    def _fit(self, now: float) -> SimNode | None:
        best: SimNode | None = None
        for node in self.nodes.values():
            if node.ready_s <= now and node.gpus - node.used_gpus >= self.gpus_per_replica:
                if best is None or node.used_gpus > best.used_gpus:
                    best = node
        return best

    def _bind(self, pod: SimPod, node: SimNode, at_s: float) -> None:
        pod.node = node.name
        pod.scheduled_s = at_s
        start = self._delay(self.spec.lead_time.pod_start_s)
        load = self._delay(self.spec.lead_time.model_load_s)
        pod.running_s = at_s + start
        pod.ready_s = pod.running_s + load
        pod.snapshot = None
        node.used_gpus += self.gpus_per_replica
        node.unneeded_since_s = None
        self._observe("pod", start)
        self._observe("load", load)

    def _schedule(self, at_s: float) -> None:
        pending = [p for p in self.pods.values() if p.node is None]
        for pod in sorted(pending, key=lambda p: p.id):
            node = self._fit(at_s)
            if node is None:
                return
            self._bind(pod, node, max(at_s, pod.created_s))

    def _request_nodes(self) -> None:
        """Request nodes so that Ready plus coming nodes hold every pod and the provisioned buffer."""
        needed = len(self.pods) * self.gpus_per_replica + self.provisioned_gpus
        have = self.node_gpus()
        pending_pods = sum(1 for p in self.pods.values() if p.node is None)
        if have >= needed and (
            pending_pods == 0 or self._room_coming() >= pending_pods * self.gpus_per_replica
        ):
            return
        deficit = max(needed - have, pending_pods * self.gpus_per_replica - self._room_coming())
        for _ in range(math.ceil(deficit / self.gpus_per_node)):
            self._add_node(self.now_s)
        if self.instant_nodes:
            self._schedule(self.now_s)

    def _room_coming(self) -> int:
        """Free GPUs on all nodes, Ready or coming."""
        return sum(n.gpus - n.used_gpus for n in self.nodes.values())

    def _release_nodes(self, now: float) -> None:
        needed = len(self.pods) * self.gpus_per_replica + self.provisioned_gpus
        spare = self.node_gpus() - needed
        for node in sorted(self.nodes.values(), key=lambda n: n.created_s, reverse=True):
            if node.used_gpus > 0 or node.ready_s > now or spare < node.gpus:
                node.unneeded_since_s = None
                continue
            if node.unneeded_since_s is None:
                node.unneeded_since_s = now
            spare -= node.gpus
            if now - node.unneeded_since_s >= self.node_release_after_s:
                del self.nodes[node.name]
                self._node_version += 1

    def _observe(self, kind: str, value: float) -> None:
        samples = self._measured[kind]
        samples.append(value)
        self._median[kind] = statistics.median(samples)
