"""The node and pod lifecycle of one scale target, as a pure model: what makes GPU capacity slow, and nothing else.

One model serves every emulated cluster: `emulation.sim.SimCluster` (the simulator's, in memory),
`emulation.local.LocalCluster` (the demo's, which only adds starting and stopping worker processes) and
`tests.fakes.cluster.FakeCluster` / `tests.fakes.kube_api` (the ReplicaSet's removal order). It models:

- a node is requested when pods are pending that no Ready or coming node can hold, or when the provisioner is
  asked to hold GPUs ahead (`provision`); it is Ready `node_provisioning_s` later (Karpenter and
  cluster-autoscaler both provision for pending pods; a capacity buffer or placeholder pods make them
  provision for the buffer too);
- a pod is bound to the fullest Ready node with room (GPU clusters bin-pack), its container runs `pod_start_s`
  after that and it is Ready `model_load_s` later; a caller with a real process behind the pod can hold it
  short of Ready until the process answers (`hold_ready` / `release_ready`);
- a node with no pods that the pods and the buffer do not need is released after `node_release_after_s`
  (Karpenter's `consolidateAfter`, cluster-autoscaler's `scale-down-unneeded-time`), and is billed whole, from
  its request to its release;
- lead times are measured as a controller would see them: the median of the last `MEASURED_SAMPLES` node
  request -> Ready, pod bind -> container running, and container running -> Ready delays;
- `set_replicas` below the current count removes pods in the ReplicaSet controller's order (`pods_to_delete`),
  so a plan that sets `pod-deletion-cost` on the pods it names gets exactly those removed when they are alike
  otherwise.

Every delay is the policy's lead time times a seeded uniform jitter (±`jitter`), so runs are repeatable. Time
moves only through `advance(now)`; nothing here reads a clock, starts a process or opens a socket.

The removal order is Kubernetes's `getPodsToDelete` (pkg/controller/replicaset/replica_set.go) sorting with
`ActivePodsWithRanks.Less` (pkg/controller/controller_utils.go), LogarithmicScaleDown on (GA since 1.31):

1. unassigned before assigned; 2. Pending before Unknown before Running; 3. not Ready before Ready;
4. lower `controller.kubernetes.io/pod-deletion-cost` first; 5. more active pods of the target on the same node
first; 6. both Ready at different times: the one Ready more recently first, times compared in log2 buckets of
their age with the UID breaking a tie in the same bucket; 7. more container restarts first; 8. newer before
older (log2 buckets and UID again). Pod names stand in for UIDs here (random in Kubernetes, so any fixed order
is as faithful).

What it does not do: carry streams (`emulation.streams`), start processes (`emulation.local`), model
preemption, zones, image caches or several scale targets, or consolidate partly used nodes by evicting their
pods (cluster-autoscaler's utilization threshold, Karpenter's `WhenEmptyOrUnderutilized`): only empty nodes are
released. So a policy that scales down without choosing its pods (HPA through the ReplicaSet, which takes pods
from the fullest nodes first, rule 5) keeps partly used nodes billed here, where a real cluster would either
bill them too (consolidation off or blocked) or evict and restart their pods (streams cut, a model load each).
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from controller import cluster, policy

JITTER = 0.2
"""Each delay is its mean times a uniform factor in [1 - JITTER, 1 + JITTER]: enough spread that the measured
lead times move, small enough that the policy's priors stay right."""

MEASURED_SAMPLES = 20
"""Lead times reported as measured are the median of this many recent observations."""

KubePhase = Literal["Pending", "Unknown", "Running"]
"""A pod's status.phase as the ReplicaSet ranks it (Succeeded and Failed pods are not active, never ranked)."""

_PHASE_ORDINAL: Mapping[str, int] = {"Pending": 0, "Unknown": 1, "Running": 2}


# --- the ReplicaSet's removal order ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemovalCandidate:
    """What the ReplicaSet controller looks at when it picks pods to delete."""

    name: str
    node: str | None
    phase: KubePhase
    ready_s: float | None
    """When the pod turned Ready (its Ready condition's lastTransitionTime), None when not Ready."""
    created_s: float
    deletion_cost: int = 0
    restarts: int = 0
    """The most restarts of any of its containers."""
    uid: str = ""
    """The tie-breaker within a log2 age bucket; the name when empty."""


def deletion_cost(annotations: Mapping[str, str]) -> int:
    """The pod's `controller.kubernetes.io/pod-deletion-cost`; 0 when unset or not an int32 (as Kubernetes)."""
    raw = annotations.get(cluster.DELETION_COST_ANNOTATION)
    if raw is None:
        return 0
    try:
        cost = int(raw)
    except ValueError:
        return 0
    return cost if -(2**31) <= cost < 2**31 else 0


def pods_to_delete(pods: Sequence[RemovalCandidate], count: int, *, now_s: float) -> list[RemovalCandidate]:
    """The `count` pods a ReplicaSet deletes when it has `len(pods)` and wants `len(pods) - count`."""
    if count <= 0:
        return []
    if count >= len(pods):
        return list(pods)
    return removal_order(pods, now_s=now_s)[:count]


def removal_order(pods: Iterable[RemovalCandidate], *, now_s: float) -> list[RemovalCandidate]:
    """`pods` sorted the ReplicaSet's way, the first to delete first (see the module docstring)."""
    pods = list(pods)
    on_node: dict[str, int] = {}
    for pod in pods:
        on_node[pod.node or ""] = on_node.get(pod.node or "", 0) + 1
    ranked = [(pod, on_node[pod.node or ""]) for pod in pods]

    def compare(a: tuple[RemovalCandidate, int], b: tuple[RemovalCandidate, int]) -> int:
        """-1 when `a` goes first, 1 when `b` does, 0 when the ReplicaSet does not tell them apart."""
        return -1 if _less(a, b, now_s) else 1 if _less(b, a, now_s) else 0

    ranked.sort(key=functools.cmp_to_key(compare))
    return [pod for pod, _ in ranked]


def _less(a: tuple[RemovalCandidate, int], b: tuple[RemovalCandidate, int], now_s: float) -> bool:
    """`ActivePodsWithRanks.Less`: whether `a` should be deleted before `b`."""
    (i, rank_i), (j, rank_j) = a, b
    if i.node != j.node and (not i.node or not j.node):
        return not i.node
    if _PHASE_ORDINAL[i.phase] != _PHASE_ORDINAL[j.phase]:
        return _PHASE_ORDINAL[i.phase] < _PHASE_ORDINAL[j.phase]
    ready_i, ready_j = i.ready_s is not None, j.ready_s is not None
    if ready_i != ready_j:
        return not ready_i
    if i.deletion_cost != j.deletion_cost:
        return i.deletion_cost < j.deletion_cost
    if rank_i != rank_j:
        return rank_i > rank_j
    if i.ready_s is not None and j.ready_s is not None and i.ready_s != j.ready_s:
        diff = _log_rank(i.ready_s, now_s) - _log_rank(j.ready_s, now_s)
        return (i.uid or i.name) < (j.uid or j.name) if diff == 0 else diff < 0
    if i.restarts != j.restarts:
        return i.restarts > j.restarts
    if i.created_s != j.created_s:
        diff = _log_rank(i.created_s, now_s) - _log_rank(j.created_s, now_s)
        return (i.uid or i.name) < (j.uid or j.name) if diff == 0 else diff < 0
    return False


def _log_rank(t_s: float, now_s: float) -> int:
    """`logarithmicRankDiff`'s rank: floor(log2(age in nanoseconds)), -1 for an age of zero or less."""
    age_ns = (now_s - t_s) * 1e9
    return int(math.log2(age_ns)) if age_ns >= 1.0 else -1


# --- the model ------------------------------------------------------------------------------------------------


@dataclass
class Pod:
    """One pod of the target; times are planned when it is bound to a node."""

    id: int
    name: str
    created_s: float
    node: str | None = None
    scheduled_s: float | None = None
    running_s: float | None = None
    """Planned time its container runs (kube phase Running from then)."""
    ready_s: float | None = None
    """Planned time the pod becomes Ready (set when it is bound to a node, moved by `hold_ready`)."""
    held: bool = False
    """Kept short of Ready by the caller (a process behind it does not answer yet)."""
    annotations: dict[str, str] = field(default_factory=dict)
    snapshot: cluster.PodState | None = None
    snapshot_phase: str = ""

    def phase(self, now: float) -> cluster.PodPhase:
        if self.scheduled_s is None:
            return "pending"
        if self.ready_s is not None and self.ready_s <= now and not self.held:
            return "ready"
        return "starting"

    def candidate(self, now: float) -> RemovalCandidate:
        running = self.running_s is not None and self.running_s <= now
        ready = self.phase(now) == "ready"
        return RemovalCandidate(
            name=self.name,
            node=self.node,
            phase="Running" if running else "Pending",
            ready_s=self.ready_s if ready else None,
            created_s=self.created_s,
            deletion_cost=deletion_cost(self.annotations),
        )


@dataclass
class Node:
    name: str
    gpus: int
    created_s: float
    ready_s: float
    used_gpus: int = 0
    unneeded_since_s: float | None = None
    gpu_product: str | None = None
    """The node's GPU type as GPU feature discovery labels it (`nvidia.com/gpu.product`); None: unlabelled."""


class Lifecycle:
    """Nodes and pods of one scale target over time, with lead times, billing and the ReplicaSet's order.

    It keeps the `controller.cluster.Cluster` protocol itself, so the simulator can hand it to the controller.
    """

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
        self.pods: dict[int, Pod] = {}
        self.nodes: dict[str, Node] = {}
        self.next_pod_id = 0
        self._next_node = 0
        self.removed: list[tuple[int, float]] = []
        """(pod id, time) of pods deleted since the caller last looked; the caller empties this list."""
        self.gpu_seconds = 0.0
        """GPU-seconds billed so far: every node's GPUs from its request to its release (or now)."""
        self._billed_to_s = start_s
        self.scale_events = 0
        """Changes of the target's replicas (set_replicas calls that changed the count)."""
        self._measured: dict[str, deque[float]] = {
            k: deque(maxlen=MEASURED_SAMPLES) for k in ("node", "pod", "load")
        }
        self._median: dict[str, float | None] = {"node": None, "pod": None, "load": None}
        self._node_gpus = 0
        """GPUs on all nodes, kept as nodes come and go (read every tick)."""
        self._unbound = 0
        """Pods not bound to a node, kept as pods come, bind and go (most ticks have none)."""
        self._node_version = 0
        self._nodes_cache: tuple[tuple[int, int], tuple[cluster.NodeState, ...]] | None = None
        self.gpu_types = [g.name for g in spec.capacity.gpu_types]
        """A mixed pool (`capacity.gpuTypes`): each new node gets the next of these GPU types in turn, as a
        NodePool offering several instance types gives when one runs short (none: one unlabelled type)."""

    # --- what a controller sees and does ---------------------------------------------------------------------

    def state(self) -> cluster.ClusterState:
        """A snapshot for `decide()`; pod and node states are reused while they do not change (it is hot)."""
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

    def set_replicas(self, replicas: int) -> None:
        """Scale the target now: add pending pods, or delete pods in the ReplicaSet's order (see `removed`)."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if replicas != self.spec_replicas:
            self.scale_events += 1
        self.spec_replicas = replicas
        live = len(self.pods)
        if replicas > live:
            for _ in range(replicas - live):
                self._new_pod(self.now_s)
            self._schedule(self.now_s)
            self._request_nodes()
        elif replicas < live:
            now = self.now_s
            by_name = {p.name: p for p in self.pods.values()}
            chosen = pods_to_delete(
                [p.candidate(now) for p in self.pods.values()], live - replicas, now_s=now
            )
            for candidate in chosen:
                self._delete(by_name[candidate.name])
            self._release_nodes(now)  # nodes left empty are unneeded from now

    def provision(self, gpus: int) -> None:
        """Hold `gpus` GPUs of node capacity beyond what the pods use."""
        self.provisioned_gpus = max(0, int(gpus))
        self._request_nodes()

    def annotate(self, pod: str, annotations: Mapping[str, str | None]) -> None:
        """Merge-patch a pod's annotations (None removes one); a pod that is gone is ignored."""
        target = self.pod_named(pod)
        if target is None:
            return
        for key, value in annotations.items():
            if value is None:
                target.annotations.pop(key, None)
            else:
                target.annotations[key] = value
        target.snapshot = None

    # --- time ------------------------------------------------------------------------------------------------

    def bootstrap(self, replicas: int) -> list[Pod]:
        """Start with `replicas` Ready pods on Ready nodes (the steady state before time starts).

        Their drawn start-up delays count as measured, as a controller reading their timestamps would.
        """
        now = self.now_s
        self.spec_replicas = replicas
        made = [self._new_pod(now - 3600.0) for _ in range(replicas)]
        nodes_needed = math.ceil(replicas * self.gpus_per_replica / self.gpus_per_node)
        for _ in range(nodes_needed):
            self._add_node(now, ready_s=now)
        for pod in made:
            node = self._fit(now)
            assert node is not None
            self._bind(pod, node, now)
            pod.scheduled_s = pod.running_s = pod.ready_s = now - 1.0
        return made

    def advance(self, now: float) -> None:
        """Move time to `now`: nodes come up and take pending pods, unneeded nodes go, billing accrues."""
        self._bill(now)
        came = [n for n in self.nodes.values() if self.now_s < n.ready_s <= now]
        for node in sorted(came, key=lambda n: n.ready_s):
            self._schedule(node.ready_s)
        self.now_s = now
        self._schedule(now)
        self._request_nodes()
        self._release_nodes(now)

    def hold_ready(self, pod: Pod) -> None:
        """Keep `pod` short of Ready whatever its planned time (its process does not answer yet)."""
        if not pod.held:
            pod.held = True
            pod.snapshot = None

    def release_ready(self, pod: Pod, at_s: float) -> None:
        """Let a held pod turn Ready at its planned time, or at `at_s` when that is later (it answered then)."""
        if pod.held and pod.ready_s is not None and at_s > pod.ready_s:
            pod.ready_s = at_s
        pod.held = False
        pod.snapshot = None

    # --- reading -----------------------------------------------------------------------------------------------

    def ready_between(self, t0: float, t1: float) -> list[tuple[int, float]]:
        """(pod id, ready time) of pods that become Ready in [t0, t1), as planned now."""
        return [
            (p.id, p.ready_s) for p in self.pods.values() if p.ready_s is not None and t0 <= p.ready_s < t1
        ]

    def node_gpus(self) -> int:
        """GPUs on nodes requested and not released (what is being billed now)."""
        return self._node_gpus

    def pod_named(self, name: str) -> Pod | None:
        """The pod called `name`, or None when there is none (removed, or never existed)."""
        if name.startswith("worker-"):
            try:
                return self.pods.get(int(name[7:]))
            except ValueError:
                return None
        return None

    # --- internals --------------------------------------------------------------------------------------------

    def _new_pod(self, created_s: float) -> Pod:
        pid = self.next_pod_id
        self.next_pod_id += 1
        pod = Pod(id=pid, name=f"worker-{pid}", created_s=created_s)
        self.pods[pid] = pod
        self._unbound += 1
        return pod

    def _delay(self, mean_s: float) -> float:
        return mean_s * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def _bill(self, now: float) -> None:
        if now > self._billed_to_s:
            self.gpu_seconds += self.node_gpus() * (now - self._billed_to_s)
            self._billed_to_s = now

    def _delete(self, pod: Pod) -> None:
        del self.pods[pod.id]
        if pod.node is None:
            self._unbound -= 1
        elif pod.node in self.nodes:
            self.nodes[pod.node].used_gpus -= self.gpus_per_replica
        self.removed.append((pod.id, self.now_s))

    def _add_node(self, now: float, *, ready_s: float | None = None) -> Node:
        name = f"gpu-node-{self._next_node}"
        self._next_node += 1
        if ready_s is None:
            delay = 0.0 if self.instant_nodes else self._delay(self.spec.lead_time.node_provisioning_s)
            ready_s = now + delay
            self._observe("node", delay)
        product = self.gpu_types[(self._next_node - 1) % len(self.gpu_types)] if self.gpu_types else None
        node = Node(name=name, gpus=self.gpus_per_node, created_s=now, ready_s=ready_s, gpu_product=product)
        self.nodes[name] = node
        self._node_gpus += node.gpus
        self._node_version += 1
        return node

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

    def _fit(self, now: float) -> Node | None:
        best: Node | None = None
        for node in self.nodes.values():
            if node.ready_s <= now and node.gpus - node.used_gpus >= self.gpus_per_replica:
                if best is None or node.used_gpus > best.used_gpus:
                    best = node
        return best

    def _bind(self, pod: Pod, node: Node, at_s: float) -> None:
        self._unbound -= 1
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
        if not self._unbound:
            return
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
        pending_pods = self._unbound
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
                self._node_gpus -= node.gpus
                self._node_version += 1

    def _observe(self, kind: str, value: float) -> None:
        samples = self._measured[kind]
        samples.append(value)
        self._median[kind] = statistics.median(samples)


def _keeps_the_protocol(model: Lifecycle) -> cluster.Cluster:
    return model  # mypy checks Lifecycle against controller.cluster.Cluster here
