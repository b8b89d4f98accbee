"""Kubernetes discovery from an InferencePool (Gateway API Inference Extension, `inference.networking.k8s.io/v1`).

An InferencePool names its model-server pods by a label selector (`spec.selector.matchLabels`) and the port they
serve on (`spec.targetPorts[0].number`); GIE endpoint pickers watch those pods directly rather than a Service's
EndpointSlices. This watch does the same with the machinery of `endpointslices.EndpointSliceWatch` (list, then
watch from the resourceVersion, relist on 410 or a broken watch; plain REST, no `kubernetes` client): its two
watched kinds are the pool object itself (a selector or port change re-targets at once) and the namespace's pods.

    GET /apis/inference.networking.k8s.io/v1/namespaces/NS/inferencepools?fieldSelector=metadata.name=NAME
    GET /api/v1/namespaces/NS/pods

How a pod maps to a backend (the same rules as an EndpointSlice endpoint):
- labels match the selector, has a pod IP, condition `Ready=True`, not being deleted: a backend, warming while it
  started less than the slow-start ramp ago;
- being deleted (`metadata.deletionTimestamp`, the pod's `terminating`) and still having its IP: kept, drained;
- annotation `forestall.dev/drain`: drained; `forestall.dev/capacity-weight`: its weight;
- not ready and not terminating: not a backend.

What this module does not do: write to the API, or read `endpointPickerRef` (that tells the gateway where we are).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from balancer import endpointslices
from balancer.config import BackendSpec
from balancer.runtime import Balancer
from contract import clock as clock_mod

log = logging.getLogger(__name__)

GROUP_VERSION = "inference.networking.k8s.io/v1"


class InferencePoolWatch(endpointslices.EndpointSliceWatch):
    """Keeps the pool's `pool:NS/NAME` source equal to the InferencePool's ready pods.

    The inherited `slices` table holds the InferencePool object (at most one: the list is by name).
    """

    def __init__(self, bal: Balancer, pool: str) -> None:
        super().__init__(bal, pool)
        self.source = f"pool:{pool}"

    def _query(self, kind: str) -> tuple[str, dict[str, str]]:
        if kind == "slices":
            path = f"/apis/{GROUP_VERSION}/namespaces/{self.namespace}/inferencepools"
            return path, {"fieldSelector": f"metadata.name={self.name}"}
        return f"/api/v1/namespaces/{self.namespace}/pods", {}

    def resync(self) -> None:
        """Recompute the pool's backends from the InferencePool and the pods seen so far, and sync the pool."""
        pool = self.slices.get(self.name)
        specs, started = pool_backends(pool, self.pods.values(), clock=self.bal.clock)
        self.bal.pool.sync(
            specs, source=self.source, initial=not self.synced and not started, started_s=started
        )
        self.synced = True


def pool_backends(
    pool: dict[str, Any] | None, pods: Iterable[dict[str, Any]], *, clock: clock_mod.Clock
) -> tuple[list[BackendSpec], dict[str, float]]:
    """The backends an InferencePool selects among `pods`, and their start times (monotonic) for warm-up."""
    if pool is None:
        return [], {}
    spec = pool.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    ports = spec.get("targetPorts") or []
    if not selector or not ports or ports[0].get("number") is None:
        log.warning("InferencePool %s has no selector or target port; no backends", pool["metadata"]["name"])
        return [], {}
    port = int(ports[0]["number"])
    specs: list[BackendSpec] = []
    started: dict[str, float] = {}
    for pod in pods:
        metadata = pod.get("metadata") or {}
        labels = metadata.get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            continue
        terminating = metadata.get("deletionTimestamp") is not None
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        if not ready and not terminating:
            continue
        annotations = metadata.get("annotations") or {}
        address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        specs.append(
            BackendSpec(
                address=address,
                pod=metadata.get("name"),
                weight=endpointslices._weight(annotations.get(endpointslices.WEIGHT_ANNOTATION)),
                drain=terminating or endpointslices.DRAIN_ANNOTATION in annotations,
            )
        )
        start = status.get("startTime")
        if start:
            age_s = clock.now() - endpointslices._parse_time(start)
            started[address] = clock.monotonic() - max(age_s, 0.0)
    return specs, started
