"""A `Cluster` made of real worker processes on this machine, for `forestall demo`.

Each replica is an emulated GPU inference server (`python -m emulation.worker`) on a loopback port.
Nodes and lead times are emulated with delays: a replica waits for a free GPU on a node, a new node takes
the policy's `node_provisioning_s` to appear, the process is started `pod_start_s` after the pod is
scheduled, and it turns Ready `model_load_s` after its port answers. Delays get seeded jitter, so the
controller's lead-time measurement has something to measure.

All times here are the caller's: the demo runs the cluster on a virtual clock that goes `time_scale` times
faster than the wall clock (so a six-minute node arrives in 45 wall seconds at 8x) and passes that time to
`tick()`; nothing in this module reads a clock.

Scale-down follows the ReplicaSet: the pods with the lowest `controller.kubernetes.io/pod-deletion-cost`
go first (then the newest), their processes are terminated, and any stream still on them is cut (the load
generator sees it). Nodes left without pods for `NODE_IDLE_S` are released, as Karpenter's
consolidation would.

The balancer learns about replicas from a static backends file this cluster writes (the balancer reloads it
on change): Ready pods appear with their pod name, pods marked with the drain
annotation are listed with `drain: true`, and `max_streams` is the replica's slot count.

Transitions happen in `tick(now)`, which the demo calls a few times a second; the Cluster methods only record
intent, so they never block.

What it does not do: schedule by GPU type or run more than one scale target.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controller import cluster, policy

NODE_IDLE_S = 120.0
"""Seconds (unscaled) an empty node lives before it is released; Karpenter's default consolidateAfter is
0-5 min, cluster-autoscaler's unneeded time 10 min."""

JITTER = 0.2
"""Delays are drawn uniformly within ±20% of the policy's priors."""


@dataclass
class _Node:
    name: str
    gpus: int
    created_s: float
    ready_at_s: float
    ready_s: float | None = None
    empty_since_s: float | None = None


@dataclass
class _Pod:
    name: str
    created_s: float
    annotations: dict[str, str] = field(default_factory=dict)
    node: str | None = None
    scheduled_s: float | None = None
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    listening_s: float | None = None
    ready_at_s: float | None = None
    ready_s: float | None = None
    started_at_s: float | None = None
    measured: bool = True
    """False for the pods the demo starts with: they were there already, their start-up is not a sample."""

    @property
    def phase(self) -> cluster.PodPhase:
        if self.node is None:
            return "pending"
        return "ready" if self.ready_s is not None else "starting"


@dataclass(frozen=True)
class WorkerSpec:
    """What each emulated replica can do: its stream slots and speed, in wall seconds (the processes run in
    real time; the demo scales their speed)."""

    slots: int
    ttft_s: float
    seconds_per_token: float


class LocalCluster:
    """Replicas as local processes behind a backends file; see the module docstring."""

    def __init__(
        self,
        spec: policy.ScalingPolicySpec,
        *,
        worker: WorkerSpec,
        backends_file: Path,
        seed: int = 0,
        host: str = "127.0.0.1",
        log_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.backends_file = backends_file
        self.host = host
        self.log_dir = log_dir
        self._rng = random.Random(seed)
        self._pods: dict[str, _Pod] = {}
        self._nodes: dict[str, _Node] = {}
        self._spec_replicas = 0
        self._provision_gpus = 0
        self._counter = 0
        self._now = 0.0
        self._node_samples: list[float] = []
        self._pod_start_samples: list[float] = []
        self._model_load_samples: list[float] = []
        self.gpu_seconds = 0.0
        """Node GPU-seconds billed so far (nodes are billed from request to release)."""
        self.scale_events = 0
        """Changes of the replica count asked through `set_replicas`."""
        self._last_tick: float | None = None
        self._written: str | None = None

    # -- the Cluster protocol ------------------------------------------------------------------------

    def state(self) -> cluster.ClusterState:
        pods = tuple(
            cluster.PodState(
                name=p.name,
                phase=p.phase,
                created_s=p.created_s,
                scheduled_s=p.scheduled_s,
                ready_s=p.ready_s,
                node=p.node,
                annotations=dict(p.annotations),
            )
            for p in self._pods.values()
        )
        nodes = tuple(
            cluster.NodeState(n.name, n.gpus, n.ready_s is not None, n.created_s, n.ready_s)
            for n in self._nodes.values()
        )
        pending = sum(n.gpus for n in self._nodes.values() if n.ready_s is None)
        return cluster.ClusterState(
            spec_replicas=self._spec_replicas,
            pods=pods,
            nodes=nodes,
            provisioned_gpus=self._provision_gpus,
            pending_gpus=pending,
            measured_node_provisioning_s=_median(self._node_samples),
            measured_pod_start_s=_median(self._pod_start_samples),
            measured_model_load_s=_median(self._model_load_samples),
        )

    def set_replicas(self, replicas: int) -> None:
        if replicas != self._spec_replicas:
            self.scale_events += 1
        self._spec_replicas = max(0, replicas)

    def provision(self, gpus: int) -> None:
        self._provision_gpus = max(0, gpus)

    def annotate(self, pod: str, annotations: Mapping[str, str | None]) -> None:
        target = self._pods.get(pod)
        if target is None:
            return
        for key, value in annotations.items():
            if value is None:
                target.annotations.pop(key, None)
            else:
                target.annotations[key] = value

    # -- time ----------------------------------------------------------------------------------------

    def start(self, now: float, replicas: int) -> None:
        """Begin with `replicas` Ready replicas on Ready nodes (the cluster as the demo finds it)."""
        self._now = now
        self._last_tick = now
        self._spec_replicas = replicas
        for _ in range(replicas):
            pod = self._new_pod(now)
            node = self._node_with_room() or self._new_node(now, instant=True)
            pod.node, pod.scheduled_s, pod.started_at_s, pod.ready_at_s = node.name, now, now, now
            pod.measured = False
            self._launch(pod)
        self.tick(now)

    def tick(self, now: float) -> None:
        """Move every node and pod along to time `now` and rewrite the backends file if it changed."""
        if self._last_tick is not None:
            billed = sum(n.gpus for n in self._nodes.values())
            self.gpu_seconds += billed * (now - self._last_tick)
        self._last_tick = now
        self._now = now
        self._reconcile_pods(now)
        self._reconcile_nodes(now)
        for pod in self._pods.values():
            self._advance_pod(pod, now)
        self._write_backends()

    def stop(self) -> None:
        """Terminate every worker process (the demo's cleanup; safe to call twice)."""
        for pod in list(self._pods.values()):
            _terminate(pod)
        self._pods.clear()

    @property
    def ready_replicas(self) -> int:
        return sum(1 for p in self._pods.values() if p.ready_s is not None)

    def addresses(self) -> dict[str, str]:
        """Pod name -> host:port of every pod with a running process."""
        return {p.name: f"{self.host}:{p.port}" for p in self._pods.values() if p.port is not None}

    # -- internals -----------------------------------------------------------------------------------

    def _reconcile_pods(self, now: float) -> None:
        live = list(self._pods.values())
        if len(live) < self._spec_replicas:
            for _ in range(self._spec_replicas - len(live)):
                self._new_pod(now)
        elif len(live) > self._spec_replicas:
            # The ReplicaSet's order: lowest deletion cost first, then unscheduled, then newest.
            def key(p: _Pod) -> tuple[int, int, int, float]:
                cost = int(p.annotations.get(cluster.DELETION_COST_ANNOTATION, "0") or 0)
                return (cost, p.node is not None, p.ready_s is not None, -p.created_s)

            for pod in sorted(live, key=key)[: len(live) - self._spec_replicas]:
                _terminate(pod)
                del self._pods[pod.name]

    def _reconcile_nodes(self, now: float) -> None:
        gpr = self.spec.capacity.gpus_per_replica
        for node in self._nodes.values():
            if node.ready_s is None and now >= node.ready_at_s:
                node.ready_s = now
                self._node_samples.append(now - node.created_s)
        pending = [p for p in self._pods.values() if p.node is None]
        for pod in sorted(pending, key=lambda p: p.created_s):
            room = self._node_with_room()
            if room is not None:
                self._schedule(pod, room, now)
        # Nodes wanted: for pods still pending plus GPUs held ahead by the provisioner.
        free_coming = sum(n.gpus - self._used(n) for n in self._nodes.values() if n.ready_s is None)
        still_pending = sum(gpr for p in self._pods.values() if p.node is None)
        want = still_pending + self._provision_gpus - free_coming - self._free_ready()
        while want > 0:
            self._new_node(now)
            want -= self.spec.capacity.gpus_per_node
        for node in list(self._nodes.values()):
            if self._used(node) == 0 and node.ready_s is not None:
                node.empty_since_s = node.empty_since_s if node.empty_since_s is not None else now
                idle_s = now - node.empty_since_s
                held = self._provision_gpus > self._free_ready() - node.gpus
                if idle_s >= NODE_IDLE_S and not held:
                    del self._nodes[node.name]
            else:
                node.empty_since_s = None

    def _advance_pod(self, pod: _Pod, now: float) -> None:
        if pod.node is None or pod.ready_s is not None:
            return
        node = self._nodes.get(pod.node)
        if node is None or node.ready_s is None:
            return
        if pod.process is None and pod.started_at_s is not None and now >= pod.started_at_s:
            self._launch(pod)
        if pod.process is not None and pod.listening_s is None and listening(self.host, pod.port):
            pod.listening_s = now
            if pod.ready_at_s is None:
                pod.ready_at_s = now + self._draw(self.spec.lead_time.model_load_s)
                self._pod_start_samples.append(now - (pod.scheduled_s or now))
        if pod.listening_s is not None and pod.ready_at_s is not None and now >= pod.ready_at_s:
            pod.ready_s = now
            if pod.measured:
                self._model_load_samples.append(now - pod.listening_s)

    def _new_pod(self, now: float) -> _Pod:
        self._counter += 1
        pod = _Pod(name=f"worker-{self._counter}", created_s=now)
        self._pods[pod.name] = pod
        return pod

    def _new_node(self, now: float, *, instant: bool = False) -> _Node:
        name = f"gpu-node-{len(self._node_samples) + len(self._nodes) + 1}-{self._rng.randrange(1 << 16):04x}"
        delay = 0.0 if instant else self._draw(self.spec.lead_time.node_provisioning_s)
        node = _Node(name, self.spec.capacity.gpus_per_node, created_s=now, ready_at_s=now + delay)
        if instant:
            node.ready_s = now
        self._nodes[name] = node
        return node

    def _schedule(self, pod: _Pod, node: _Node, now: float) -> None:
        pod.node = node.name
        pod.scheduled_s = max(now, node.ready_at_s)
        pod.started_at_s = pod.scheduled_s + self._draw(self.spec.lead_time.pod_start_s)

    def _node_with_room(self) -> _Node | None:
        gpr = self.spec.capacity.gpus_per_replica
        # Only Ready nodes take pods: a pod on a node still provisioning would be Pending in Kubernetes too.
        nodes = sorted((n for n in self._nodes.values() if n.ready_s is not None), key=lambda n: n.ready_at_s)
        for node in nodes:
            if node.gpus - self._used(node) >= gpr:
                return node
        return None

    def _used(self, node: _Node) -> int:
        gpr = self.spec.capacity.gpus_per_replica
        return sum(gpr for p in self._pods.values() if p.node == node.name)

    def _free_ready(self) -> int:
        return sum(n.gpus - self._used(n) for n in self._nodes.values() if n.ready_s is not None)

    def _draw(self, prior_s: float) -> float:
        """A delay around the policy's prior."""
        return prior_s * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _launch(self, pod: _Pod) -> None:
        pod.port = free_port(self.host)
        log = subprocess.DEVNULL
        if self.log_dir is not None:
            log = os.open(self.log_dir / f"{pod.name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pod.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emulation.worker",
                "--listen",
                f"{self.host}:{pod.port}",
                "--slots",
                str(self.worker.slots),
                "--ttft-s",
                f"{self.worker.ttft_s:g}",
                "--seconds-per-token",
                f"{self.worker.seconds_per_token:g}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        if isinstance(log, int) and log != subprocess.DEVNULL:
            os.close(log)

    def _write_backends(self) -> None:
        backends = []
        for pod in sorted(self._pods.values(), key=lambda p: p.name):
            if pod.port is None or pod.ready_s is None:
                continue
            entry: dict[str, object] = {
                "address": f"{self.host}:{pod.port}",
                "pod": pod.name,
                "weight": 1.0,
                "max_streams": self.worker.slots,
            }
            if cluster.DRAIN_ANNOTATION in pod.annotations:
                entry["drain"] = True
            backends.append(entry)
        text = json.dumps({"backends": backends}, indent=1)
        if text != self._written:
            tmp = self.backends_file.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.backends_file)
            self._written = text


def _terminate(pod: _Pod) -> None:
    if pod.process is not None:
        stop_process(pod.process, grace_s=5.0)


def stop_process(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM a child's whole process group, SIGKILL it after `grace_s`; safe on a process already gone."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def listening(host: str, port: int | None) -> bool:
    """Whether something accepts connections on host:port."""
    if port is None:
        return False
    with socket.socket() as sock:
        sock.settimeout(0.05)
        return sock.connect_ex((host, port)) == 0


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values[-20:])
    return ordered[len(ordered) // 2]
