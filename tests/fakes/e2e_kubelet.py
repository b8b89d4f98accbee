"""The ReplicaSet controller, the kubelet and the EndpointSlice controller for end-to-end tests.

`FakeKubelet` runs beside the in-test API server (`tests.fakes.kube_api.FakeKubeApi`) and makes a
Deployment's replicas real: every `poll_s` it

1. lets the API server play the ReplicaSet (`FakeKubeApi.run_workloads`): pods are created up to
   `spec.replicas`, and on a scale-down pods are deleted in the ReplicaSet controller's order (among Ready
   pods, the lowest `controller.kubernetes.io/pod-deletion-cost` first); which pods went, with the annotations
   they carried at that moment, is recorded in `removed`;
2. walks each new pod through its life on the real clock, with the delays given: bound to the GPU node
   (`PodScheduled`), container started (an in-process emulated GPU server, `emulation.worker`, on
   its own loopback port; the endpoint appears, not ready), then Ready after the model-load delay (the
   endpoint turns ready, so the balancer may send it streams);
3. for each deleted pod, marks its endpoint `terminating` (the balancer drains it), records how many streams
   its server still had running or queued (a stream cut by the removal shows up here), stops the server
   and deletes the endpoint.

Each pod gets its own EndpointSlice (`<service>-<pod>`) because every emulated server listens on
127.0.0.1 with its own port; Kubernetes does the same when pods of one Service expose different ports.
The Deployment's `spec.replicas` is sampled on every poll (`replica_history`), so a test can say when the
controller asked for capacity.

It also registers the GPU node the pods run on, created `node_provisioning_s` before it turned Ready, so
the controller has a node lead time to measure.

What it does not do: schedule across several nodes, run readiness probes, or honour grace periods beyond
stopping the emulated server (which ends its open streams).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from contract import clock as clock_mod
from controller import cluster
from emulation import worker as backend_emulator
from tests.fakes import kube_api
from tests.fakes.balancer_env import start_app

Obj = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DELETION_COST = cluster.DELETION_COST_ANNOTATION
MAX_POLLS = 100_000
"""Polls one kubelet makes at most (about 80 minutes at 50 ms): bounds a test that forgets to stop it."""


@dataclass(frozen=True)
class Delays:
    """Seconds each step of a pod's start takes (real time)."""

    schedule_s: float = 0.3
    """Created -> bound to the node (PodScheduled)."""
    container_start_s: float = 1.0
    """Bound -> container running (the emulated server starts listening)."""
    model_load_s: float = 2.0
    """Container running -> Ready (the endpoint turns ready)."""


@dataclass(frozen=True)
class Emulation:
    """The emulated GPU server each pod runs."""

    slots: int = 4
    ttft_s: float = 0.05
    seconds_per_token: float = 0.05


@dataclass
class _Pod:
    name: str
    seen_s: float
    scheduled_s: float | None = None
    running_s: float | None = None
    ready_s: float | None = None
    runner: web.AppRunner | None = None
    app: web.Application | None = None
    port: int | None = None


@dataclass(frozen=True)
class Removal:
    """A pod the ReplicaSet deleted: when, the annotations it carried, what its server still had."""

    pod: str
    time_s: float
    annotations: dict[str, str]
    streams_left: int | None = None
    """Streams running or queued on its server when it was stopped (None: it never started one)."""


@dataclass
class FakeKubelet:
    """See the module docstring. `async with FakeKubelet(api, ...) as kubelet:` runs it."""

    api: kube_api.FakeKubeApi
    namespace: str
    deployment: str
    service: str
    node: str = "gpu-node-0"
    node_gpus: int = 8
    node_provisioning_s: float = 4.0
    delays: Delays = Delays()
    emulation: Emulation = Emulation()
    poll_s: float = 0.05
    clock: clock_mod.Clock = clock_mod.SYSTEM
    replica_history: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic time, Deployment spec.replicas) at start and at every change."""
    removed: list[Removal] = field(default_factory=list)
    pods: dict[str, _Pod] = field(default_factory=dict)
    on_poll: Callable[[], None] | None = None

    _task: asyncio.Task[None] | None = None
    _stopping: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> FakeKubelet:
        now = self.clock.now()
        self.api.put(
            kube_api.gpu_node(
                self.node,
                gpus=self.node_gpus,
                created=clock_mod.utc_iso(now - self.node_provisioning_s),
                ready_at=clock_mod.utc_iso(now),
            )
        )
        self._task = asyncio.create_task(self._run(), name="e2e-kubelet")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        for pod in list(self.pods.values()):
            await self._stop_server(pod)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    # --- what tests read -------------------------------------------------------------------------------

    def replicas_at_least(self, replicas: int) -> float | None:
        """Monotonic time the Deployment first asked for at least `replicas`, None if it never did."""
        return next((t for t, n in self.replica_history if n >= replicas), None)

    def ready_pods(self) -> list[str]:
        return sorted(name for name, pod in self.pods.items() if pod.ready_s is not None)

    def server(self, pod: str) -> backend_emulator.Emulator | None:
        app = self.pods[pod].app if pod in self.pods else None
        return app[backend_emulator.EMULATOR] if app is not None else None

    # --- the loop --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        for _ in range(MAX_POLLS):
            if self._stop.is_set():
                return
            await self._poll()
            if self.on_poll is not None:
                self.on_poll()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._stop.wait()

    async def _poll(self) -> None:
        ns = self.namespace
        owner = self.api.get("apps", "deployments", ns, self.deployment)
        if owner is not None:
            replicas = int(owner["spec"].get("replicas", 1))
            if not self.replica_history or self.replica_history[-1][1] != replicas:
                self.replica_history.append((self.clock.monotonic(), replicas))
        before = {p["metadata"]["name"]: p for p in self.api.objects("", "pods", ns)}
        self.api.run_workloads(namespace=ns)
        after = {p["metadata"]["name"]: p for p in self.api.objects("", "pods", ns)}
        now = self.clock.monotonic()
        for name in sorted(set(before) - set(after)):
            self._remove(name, before[name], now)
        for name in sorted(set(after) - set(self.pods)):
            self.pods[name] = _Pod(name, seen_s=now)
        for name in sorted(after):
            await self._advance(self.pods[name], now)

    async def _advance(self, pod: _Pod, now: float) -> None:
        d = self.delays
        if pod.scheduled_s is None:
            if now - pod.seen_s >= d.schedule_s:
                self.api.set_pod_state(self.namespace, pod.name, node=self.node)
                pod.scheduled_s = now
            return
        if pod.running_s is None:
            if now - pod.scheduled_s >= d.container_start_s:
                e = self.emulation
                pod.app = backend_emulator.create_app(
                    slots=e.slots,
                    ttft_s=e.ttft_s,
                    seconds_per_token=e.seconds_per_token,
                    name=pod.name,
                    clock=self.clock,
                )
                pod.runner, address = await start_app(pod.app)
                pod.port = int(address.rsplit(":", 1)[1])
                self.api.set_pod_state(self.namespace, pod.name, running=True, ready=False)
                self._write_slice(pod, ready=False)
                pod.running_s = now
            return
        if pod.ready_s is None and now - pod.running_s >= d.model_load_s:
            self.api.set_pod_state(self.namespace, pod.name, ready=True)
            self._write_slice(pod, ready=True)
            pod.ready_s = now

    def _remove(self, name: str, last: Obj, now: float) -> None:
        pod = self.pods.pop(name, None)
        annotations = dict(last["metadata"].get("annotations") or {})
        left: int | None = None
        if pod is not None and pod.app is not None:
            server = pod.app[backend_emulator.EMULATOR]
            left = server.gate.running + server.gate.waiting
            self._write_slice(pod, ready=False, terminating=True)
            task = asyncio.create_task(self._stop_server(pod, delete_slice=True))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        self.removed.append(Removal(name, now, annotations, left))

    async def _stop_server(self, pod: _Pod, *, delete_slice: bool = False) -> None:
        runner, pod.runner = pod.runner, None
        if runner is not None:
            await runner.cleanup()
        if delete_slice:
            with contextlib.suppress(KeyError):
                self.api.delete("discovery.k8s.io", "endpointslices", self.namespace, self._slice_name(pod))

    def _slice_name(self, pod: _Pod) -> str:
        return f"{self.service}-{pod.name}"

    def _write_slice(self, pod: _Pod, *, ready: bool, terminating: bool = False) -> None:
        assert pod.port is not None
        self.api.put(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": self._slice_name(pod),
                    "namespace": self.namespace,
                    "labels": {
                        SERVICE_NAME_LABEL: self.service,
                        "endpointslice.kubernetes.io/managed-by": "e2e-kubelet.forestall.dev",
                    },
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": pod.port, "protocol": "TCP"}],
                "endpoints": [
                    {
                        "addresses": ["127.0.0.1"],
                        "conditions": {
                            "ready": ready and not terminating,
                            "serving": ready or terminating,
                            "terminating": terminating,
                        },
                        "nodeName": self.node,
                        "targetRef": {"kind": "Pod", "name": pod.name, "namespace": self.namespace},
                    }
                ],
            }
        )


def service_slice(namespace: str, service: str, *, port: int, name: str | None = None) -> Obj:
    """A ready EndpointSlice for a Service served by one process on 127.0.0.1:`port` (e.g. the balancer)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-0",
            "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "admin", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True, "serving": True}}],
    }
