"""`FakeCluster`: an in-memory `controller.cluster.Cluster` for tests of whatever drives a cluster.

It records every call in `calls` (method name and arguments, in order), raises `next_error` once on the next
call when a test sets it (then clears it), and applies what it is told to its own `ClusterState` so a test can
read back the result: `set_replicas` adds pending pods, or removes pods in the ReplicaSet controller's order
(`emulation.lifecycle.pods_to_delete`, the one the simulator and the demo use too), `annotate` merge-patches pod annotations, `provision` records the GPUs held. Pods do not
start on their own: a test moves them with `set_phase()`.

What it does not do: model timing (the simulator's cluster does) or talk to any API.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from controller import cluster
from emulation import lifecycle


class FakeCluster:
    """A cluster in memory that does what it is told and remembers what it was told."""

    def __init__(self, state: cluster.ClusterState | None = None, *, now_s: float = 1_700_000_000.0) -> None:
        self.initial = state if state is not None else cluster.ClusterState(spec_replicas=0)
        self.now_s = now_s
        """Creation time given to pods this fake adds; tests move it along with their clock."""
        self.reset()

    def reset(self) -> None:
        """Back to the initial state, with no calls recorded and no error pending."""
        self.current = self.initial
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.next_error: BaseException | None = None
        self._serial = len(self.initial.pods)

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.next_error is not None:
            error, self.next_error = self.next_error, None
            raise error

    def state(self) -> cluster.ClusterState:
        self._record("state")
        return self.current

    def set_replicas(self, replicas: int) -> None:
        self._record("set_replicas", replicas)
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        pods = [p for p in self.current.pods if p.phase != "terminating"]
        if replicas > len(pods):
            for _ in range(replicas - len(pods)):
                self._serial += 1
                pods.append(
                    cluster.PodState(name=f"worker-{self._serial}", phase="pending", created_s=self.now_s)
                )
        elif replicas < len(pods):
            chosen = lifecycle.pods_to_delete(
                [_candidate(p) for p in pods], len(pods) - replicas, now_s=self.now_s
            )
            gone = {c.name for c in chosen}
            pods = [p for p in pods if p.name not in gone]
        self.current = dataclasses.replace(self.current, spec_replicas=replicas, pods=tuple(pods))

    def provision(self, gpus: int) -> None:
        self._record("provision", gpus)
        self.current = dataclasses.replace(self.current, provisioned_gpus=gpus)

    def annotate(self, pod: str, annotations: Mapping[str, str | None]) -> None:
        self._record("annotate", pod, dict(annotations))
        pods = list(self.current.pods)
        for i, p in enumerate(pods):
            if p.name == pod:
                merged = {**p.annotations}
                for key, value in annotations.items():
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
                pods[i] = dataclasses.replace(p, annotations=merged)
                break
        else:
            raise KeyError(f"no pod named {pod!r}")
        self.current = dataclasses.replace(self.current, pods=tuple(pods))

    def set_phase(self, pod: str, phase: cluster.PodPhase, *, at_s: float | None = None) -> None:
        """Move a pod to `phase` (a test's stand-in for the scheduler and the kubelet)."""
        at = self.now_s if at_s is None else at_s
        pods = list(self.current.pods)
        for i, p in enumerate(pods):
            if p.name == pod:
                pods[i] = dataclasses.replace(
                    p,
                    phase=phase,
                    scheduled_s=p.scheduled_s if phase == "pending" else (p.scheduled_s or at),
                    ready_s=at if phase == "ready" else p.ready_s,
                )
                self.current = dataclasses.replace(self.current, pods=tuple(pods))
                return
        raise KeyError(f"no pod named {pod!r}")

    def names(self, method: str) -> list[tuple[Any, ...]]:
        """Arguments of every recorded call to `method`, in order."""
        return [args for name, args in self.calls if name == method]


def _candidate(pod: cluster.PodState) -> lifecycle.RemovalCandidate:
    """A pod as the ReplicaSet ranks it. A `starting` pod is bound and counted as Running (its container loads
    the model); `pending` is Pending; Ready pods carry their ready time."""
    return lifecycle.RemovalCandidate(
        name=pod.name,
        node=pod.node or ("node" if pod.phase != "pending" else None),
        phase="Pending" if pod.phase == "pending" else "Running",
        ready_s=(pod.ready_s if pod.ready_s is not None else pod.created_s) if pod.phase == "ready" else None,
        created_s=pod.created_s,
        deletion_cost=lifecycle.deletion_cost(pod.annotations),
    )


_: cluster.Cluster = FakeCluster()
