"""A `Cluster` made of real worker processes on this machine, for `forestall demo`.

Nodes and pods come and go exactly as in the simulator: this cluster runs the same model,
`emulation.lifecycle.Lifecycle` (node request -> Ready, pod bind -> container start -> model load with seeded
jitter, whole-node billing, measured lead times, the ReplicaSet's removal order), and only adds processes.
Each pod whose container starts gets an emulated GPU inference server (`python -m emulation.worker`) on a
loopback port; the pod turns Ready at its planned time or, if later, once that port answers; a pod the
ReplicaSet deletes has its process terminated, and any stream still on it is cut (the load generator sees
it). Nodes left without pods are released after `NODE_IDLE_S`, as Karpenter's consolidation would. The
measured lead times are the model's drawn delays; a worker slower to answer than its model load (a Python
start takes about a second of wall time, `time_scale` virtual seconds) turns Ready later than measured.

All times here are the caller's: the demo runs the cluster on a virtual clock that goes `time_scale` times
faster than the wall clock (so a six-minute node arrives in 45 wall seconds at 8x) and passes that time to
`tick()`; nothing in this module reads a clock.

The balancer learns about replicas from a static backends file this cluster writes (the balancer reloads it
on change): Ready pods appear with their pod name, pods marked with the drain annotation are listed with
`drain: true`, and `max_streams` is the replica's slot count.

Transitions happen in `tick(now)`, which the demo calls a few times a second; `set_replicas` and `provision`
only record intent (stopping a process may take seconds), so the Cluster methods never block.

What it does not do: schedule by GPU type or run more than one scale target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from controller import cluster, policy
from emulation import lifecycle, processes

NODE_IDLE_S = 120.0
"""Seconds (unscaled) an empty node lives before it is released; Karpenter's default consolidateAfter is
0-5 min, cluster-autoscaler's unneeded time 10 min."""

STOP_GRACE_S = 5.0
"""Wall seconds a removed worker gets to end after SIGTERM before SIGKILL (it closes its streams at once)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What each emulated replica can do: its stream slots and speed, in wall seconds (the processes run in
    real time; the demo scales their speed)."""

    slots: int
    ttft_s: float
    seconds_per_token: float


@dataclass
class _Process:
    port: int
    popen: subprocess.Popen[bytes]


class LocalCluster:
    """Replicas as local processes behind a backends file; see the module docstring."""

    def __init__(
        self,
        spec: policy.ScalingPolicySpec,
        *,
        worker: WorkerSpec,
        backends_file: Path,
        seed: int = 0,
        host: str = processes.LOOPBACK,
        log_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.backends_file = backends_file
        self.seed = seed
        self.host = host
        self.log_dir = log_dir
        self._model: lifecycle.Lifecycle | None = None
        self._want_replicas = 0
        self._want_gpus = 0
        self.processes: dict[int, _Process] = {}
        """Pod id -> its worker process, for every pod whose container has started."""
        self._written: str | None = None

    @property
    def model(self) -> lifecycle.Lifecycle:
        """The node and pod model; it exists from `start()` on."""
        if self._model is None:
            raise RuntimeError("LocalCluster: call start() before using the cluster")
        return self._model

    # -- the Cluster protocol ------------------------------------------------------------------------

    def state(self) -> cluster.ClusterState:
        return self.model.state()

    def set_replicas(self, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        self._want_replicas = replicas

    def provision(self, gpus: int) -> None:
        self._want_gpus = max(0, gpus)

    def annotate(self, pod: str, annotations: Mapping[str, str | None]) -> None:
        self.model.annotate(pod, annotations)

    # -- time ----------------------------------------------------------------------------------------

    def start(self, now: float, replicas: int) -> None:
        """Begin with `replicas` Ready replicas on Ready nodes (the cluster as the demo finds it)."""
        self._model = lifecycle.Lifecycle(
            self.spec, seed=self.seed, start_s=now, node_release_after_s=NODE_IDLE_S
        )
        self._want_replicas = replicas
        self._model.bootstrap(replicas)
        self.tick(now)

    def tick(self, now: float) -> None:
        """Move every node and pod along to time `now` and rewrite the backends file if it changed."""
        model = self.model
        model.advance(now)
        if model.spec_replicas != self._want_replicas:
            model.set_replicas(self._want_replicas)
        if model.provisioned_gpus != self._want_gpus:
            model.provision(self._want_gpus)
        for pid, _ in model.removed:
            gone = self.processes.pop(pid, None)
            if gone is not None:
                processes.stop_process(gone.popen, grace_s=STOP_GRACE_S)
        model.removed.clear()
        for pod in model.pods.values():
            proc = self.processes.get(pod.id)
            if proc is None:
                model.hold_ready(pod)  # Ready needs a process that answers
                if pod.running_s is not None and pod.running_s <= now:
                    self.processes[pod.id] = self._launch(pod.name)
            elif pod.held and processes.listening(self.host, proc.port):
                model.release_ready(pod, now)
        self._write_backends(now)

    def stop(self) -> None:
        """Terminate every worker process (the demo's cleanup; safe to call twice)."""
        for proc in self.processes.values():
            processes.stop_process(proc.popen, grace_s=STOP_GRACE_S)
        self.processes.clear()

    @property
    def gpu_seconds(self) -> float:
        """Node GPU-seconds billed so far (whole nodes, from request to release)."""
        return self.model.gpu_seconds

    @property
    def scale_events(self) -> int:
        """Changes of the target's replica count."""
        return self.model.scale_events

    @property
    def ready_replicas(self) -> int:
        return self.model.state().ready_replicas

    def addresses(self) -> dict[str, str]:
        """Pod name -> host:port of every pod with a running process."""
        pods = self.model.pods
        return {pods[pid].name: f"{self.host}:{p.port}" for pid, p in self.processes.items() if pid in pods}

    # -- internals -----------------------------------------------------------------------------------

    def _launch(self, name: str) -> _Process:
        port = processes.free_port(self.host)
        log = subprocess.DEVNULL
        if self.log_dir is not None:
            log = os.open(self.log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emulation.worker",
                "--listen",
                f"{self.host}:{port}",
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
        if log != subprocess.DEVNULL:
            os.close(log)
        return _Process(port, popen)

    def _write_backends(self, now: float) -> None:
        backends = []
        for pod in sorted(self.model.pods.values(), key=lambda p: p.name):
            proc = self.processes.get(pod.id)
            if proc is None or pod.phase(now) != "ready":
                continue
            entry: dict[str, object] = {
                "address": f"{self.host}:{proc.port}",
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
