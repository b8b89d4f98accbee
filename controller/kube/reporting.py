"""What the controller tells Kubernetes about a policy: the status subresource, Events, and the policy watch.

- Status is written with a JSON merge patch on `scalingpolicies/status` carrying the whole status (the
  conditions list is replaced as a whole, as merge patches do with lists), and only when it differs from the
  last status this process wrote, so a steady policy costs no write per cycle.
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


class Reporter:
    """Writes ScalingPolicy status and Events for one controller replica."""

    def __init__(
        self, api_client: client.ApiClient, *, identity: str, clock: clock_mod.Clock = clock_mod.SYSTEM
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.events = client.EventsV1Api(api_client)
        self.identity = identity
        self.clock = clock
        self._written: dict[tuple[str, str], Obj] = {}
        self._recent: dict[tuple[str, str, str, str], float] = {}
        self._lock = threading.Lock()

    def write_status(self, namespace: str, name: str, status: Obj) -> bool:
        """Merge-patch the status subresource; False (no call) when it is what this process last wrote."""
        key = (namespace, name)
        with self._lock:
            if self._written.get(key) == status:
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
            self._written[key] = status
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
