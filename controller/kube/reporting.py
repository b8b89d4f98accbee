"""What the controller tells Kubernetes about a policy: the status subresource, Events, and the policy watch.

- Status is written with a JSON merge patch on `scalingpolicies/status` carrying the whole status (the
  conditions list is replaced as a whole, as merge patches do with lists), and only when it changed
  meaningfully from the last status this process wrote (`essence()`: replicas, GPUs, draining pods, the
  last scale, each condition's type, status and reason, the forecast's settings), or when that write is
  older than `STATUS_REFRESH_S`. The live figures (observed demand, forecast value, condition messages) move
  every cycle; writing them each time cost about 67 writes/s at 1,000 policies for nothing a reader acts on.
- Events are `events.k8s.io/v1` Events regarding the ScalingPolicy, with `reportingController`
  `forestall.dev/controller` and this replica as `reportingInstance`. The same reason and note for the same
  policy are not repeated within `EVENT_REPEAT_S` (kube's own recorder aggregates repeats the same way), so
  a steady drain does not flood the namespace.
- `policy_informer` is the list+watch cache of ScalingPolicies (all namespaces or one).

What this module does not do: decide what the status says (`controller.status` builds it).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client

from contract import clock as clock_mod
from controller import errors, policy
from controller.kube import api, informer

log = logging.getLogger(__name__)

Obj = dict[str, Any]

REPORTING_CONTROLLER = "forestall.dev/controller"
EVENT_REPEAT_S = 600.0
"""An identical Event for the same policy is not written again within this long (10 minutes)."""

RECENT_EVENTS_MAX = 10_000
"""Remembered Events before the ones older than `EVENT_REPEAT_S` are forgotten (bounds memory)."""

STATUS_REFRESH_S = 300.0
"""A status whose essence did not change is still rewritten this often, so its live figures are at most five
minutes old (one write per policy per 5 min: 3.3 writes/s at 1,000 policies)."""

NOTE_MAX_CHARS = 1024
"""events.k8s.io/v1 rejects notes longer than 1 kB."""


def policy_informer(
    api_client: client.ApiClient,
    *,
    namespace: str | None = None,
    on_change: Callable[[str, Obj], None] | None = None,
) -> informer.Informer:
    """A list+watch cache of ScalingPolicies in `namespace` (None: all namespaces)."""
    custom = client.CustomObjectsApi(api_client)
    if namespace:
        return informer.Informer(
            custom.list_namespaced_custom_object,
            policy.GROUP,
            policy.VERSION,
            namespace,
            policy.PLURAL,
            name="scalingpolicies",
            on_change=on_change,
        )
    return informer.Informer(
        custom.list_cluster_custom_object,
        policy.GROUP,
        policy.VERSION,
        policy.PLURAL,
        name="scalingpolicies",
        on_change=on_change,
    )


_LIVE_FIELDS = ("observedDemand", "measuredLeadTime")
"""Status fields that move every cycle without anyone needing to act on the change."""


def essence(status: Obj) -> Obj:
    """What of a status is worth a write: everything but the live figures and condition messages."""
    out = {k: v for k, v in status.items() if k not in _LIVE_FIELDS}
    if isinstance(out.get("forecast"), dict):
        out["forecast"] = {k: v for k, v in out["forecast"].items() if k != "value"}
    out["conditions"] = [
        {k: c.get(k) for k in ("type", "status", "reason", "observedGeneration")}
        for c in status.get("conditions") or []
    ]
    return out


class Reporter:
    """Writes ScalingPolicy status and Events for one controller replica."""

    def __init__(
        self, api_client: client.ApiClient, *, identity: str, clock: clock_mod.Clock = clock_mod.SYSTEM
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.events = client.EventsV1Api(api_client)
        self.identity = identity
        self.clock = clock
        self._written: dict[tuple[str, str], tuple[Obj, float]] = {}
        self._recent: dict[tuple[str, str, str, str], float] = {}
        self._lock = threading.Lock()

    def write_status(self, namespace: str, name: str, status: Obj) -> bool:
        """Merge-patch the status subresource; False (no call) when it did not change meaningfully since
        this process last wrote it, and that write is younger than `STATUS_REFRESH_S`."""
        key = (namespace, name)
        now = self.clock.monotonic()
        with self._lock:
            last = self._written.get(key)
            if last is not None and (
                last[0] == status
                or (essence(last[0]) == essence(status) and now - last[1] < STATUS_REFRESH_S)
            ):
                return False
        api.call(
            self.custom.patch_namespaced_custom_object_status,
            policy.GROUP,
            policy.VERSION,
            namespace,
            policy.PLURAL,
            name,
            {"status": status},
        )
        with self._lock:
            self._written[key] = (status, now)
        return True

    def forget(self, namespace: str, name: str) -> None:
        """Drop what was remembered of a deleted policy."""
        with self._lock:
            self._written.pop((namespace, name), None)
            for key in [k for k in self._recent if k[:2] == (namespace, name)]:
                del self._recent[key]

    def event(self, regarding: Obj, *, reason: str, note: str, action: str, warning: bool = False) -> bool:
        """Record an Event about a ScalingPolicy object; False when the same one was recorded recently."""
        meta = regarding["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        now = self.clock.now()
        key = (namespace, name, reason, note)
        with self._lock:
            last = self._recent.get(key)
            if last is not None and now - last < EVENT_REPEAT_S:
                return False
            if len(self._recent) >= RECENT_EVENTS_MAX:
                self._recent = {k: t for k, t in self._recent.items() if now - t < EVENT_REPEAT_S}
            self._recent[key] = now
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "eventTime": api.micro_time(now),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.identity[:128],
            "action": action[:128],
            "reason": reason[:128],
            "note": note[:NOTE_MAX_CHARS],
            "type": "Warning" if warning else "Normal",
            "regarding": {
                "apiVersion": policy.API_VERSION,
                "kind": policy.KIND,
                "name": name,
                "namespace": namespace,
                **({"uid": meta["uid"]} if meta.get("uid") else {}),
                **({"resourceVersion": meta["resourceVersion"]} if meta.get("resourceVersion") else {}),
            },
        }
        try:
            api.call(self.events.create_namespaced_event, namespace, body)
        except errors.ClusterError as exc:
            # An Event is best effort: losing one must not fail the reconcile that acted.
            log.warning("%s/%s: could not record event %s: %s", namespace, name, reason, exc)
            return False
        return True
