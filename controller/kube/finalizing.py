"""The ScalingPolicy finalizer: nothing the controller made or marked outlives the policy's hold on it.

While a policy is active the controller keeps the finalizer `forestall.dev/cleanup` on it. Cleanup runs:

- when the policy is deleted (its `deletionTimestamp` is set): release held capacity (placeholder pods,
  CapacityBuffers, ProvisioningRequests and their PodTemplates, `provisioners.release_all`), remove the pod
  annotations the controller wrote (drain marks, `karpenter.sh/do-not-disrupt`, pod-deletion-cost), then
  remove the finalizer so the API server completes the deletion;
- when the policy moves to `mode: dryRun` (or the controller runs with `--dry-run`): the same, and the
  finalizer goes, since a dry-run policy holds nothing;
- when it switches provisioner type: the old type's objects are released (`KubeCluster` does it on the next
  read of its state).

Which annotations are ours: every write of one of those three keys also records it, with its value, in the
pod annotation `forestall.dev/wrote` (JSON: the policy's name and the keys with the values written). Cleanup
removes a key only while it still holds the value written, so a value someone else set since is theirs.

Everything the provisioners create also carries an ownerReference to the policy, so the garbage collector
removes it even if the controller is gone when the policy is deleted (the annotations cannot be owned: they
are why the finalizer exists).

What this module does not do: decide when to clean up (the loop asks), or create anything.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubernetes import client

from controller import cluster, errors, policy
from controller.kube import api

log = logging.getLogger(__name__)

Obj = dict[str, Any]

FINALIZER = "forestall.dev/cleanup"
WROTE_ANNOTATION = "forestall.dev/wrote"
"""Pod annotation recording the annotations the controller wrote there (see the module docstring)."""

OWNED_KEYS = (
    cluster.DRAIN_ANNOTATION,
    cluster.DO_NOT_DISRUPT_ANNOTATION,
    cluster.DELETION_COST_ANNOTATION,
)
"""The pod annotations the controller writes and cleanup removes."""


def wrote(pod: Obj) -> dict[str, str]:
    """The annotations recorded as written by the controller on a pod ({} when none or unreadable)."""
    raw = (pod.get("metadata", {}).get("annotations") or {}).get(WROTE_ANNOTATION)
    if not raw:
        return {}
    try:
        record = json.loads(raw)
        return {str(k): str(v) for k, v in dict(record.get("set", {})).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def record(policy_name: str, written: dict[str, str]) -> str | None:
    """The `forestall.dev/wrote` value for these written annotations (None: remove the record)."""
    if not written:
        return None
    return json.dumps({"policy": policy_name, "set": dict(sorted(written.items()))}, separators=(",", ":"))


def owner_of_record(pod: Obj) -> str | None:
    raw = (pod.get("metadata", {}).get("annotations") or {}).get(WROTE_ANNOTATION)
    try:
        return str(json.loads(raw)["policy"]) if raw else None
    except (ValueError, TypeError, KeyError):
        return None


def unmark_patch(pod: Obj) -> dict[str, str | None]:
    """The annotation patch removing what the controller wrote on a pod (empty: nothing to remove)."""
    have = pod.get("metadata", {}).get("annotations") or {}
    patch: dict[str, str | None] = {}
    for key, value in wrote(pod).items():
        if have.get(key) == value:
            patch[key] = None
    if WROTE_ANNOTATION in have:
        patch[WROTE_ANNOTATION] = None
    return patch


def has_finalizer(obj: Obj) -> bool:
    return FINALIZER in (obj.get("metadata", {}).get("finalizers") or [])


def set_finalizer(api_client: client.ApiClient, obj: Obj, *, present: bool) -> None:
    """Add or remove our finalizer on a ScalingPolicy (merge patch of the whole list, guarded by the read
    resourceVersion: a concurrent change is a 409, which requeues the policy)."""
    meta = obj["metadata"]
    current = list(meta.get("finalizers") or [])
    wanted = [f for f in current if f != FINALIZER] + ([FINALIZER] if present else [])
    if wanted == current:
        return
    body = {"metadata": {"finalizers": wanted or None, "resourceVersion": meta.get("resourceVersion")}}
    try:
        api.call(
            client.CustomObjectsApi(api_client).patch_namespaced_custom_object,
            policy.GROUP,
            policy.VERSION,
            meta.get("namespace", "default"),
            policy.PLURAL,
            meta["name"],
            body,
        )
    except errors.NotFound:
        if present:
            raise
    log.info(
        "%s/%s: finalizer %s %s",
        meta.get("namespace"),
        meta["name"],
        FINALIZER,
        "added" if present else "removed",
    )
