"""REST plumbing of the fake API server: recorded calls, Status errors, patches, selectors, scale objects."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from emulation import lifecycle

Obj = dict[str, Any]


@dataclass(frozen=True)
class ApiCall:
    """One resource request, as RBAC sees it."""

    verb: str
    group: str
    version: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    status: int = 0


class ApiError(Exception):
    """An error answered as a Kubernetes `Status` object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: Obj | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}
        self.headers = headers or {}

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


# --- helpers ---------------------------------------------------------------------------------------------

REASONS = {
    409: "Conflict",
    404: "NotFound",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def dataclass_replace(call: ApiCall, **changes: Any) -> ApiCall:
    import dataclasses

    return dataclasses.replace(call, **changes)


def plural_of(kind: str) -> str:
    return {"Deployment": "deployments", "StatefulSet": "statefulsets"}[kind]


async def json_body(request: web.Request) -> Obj:
    try:
        body = json.loads(await request.text())
    except json.JSONDecodeError as exc:
        raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the body must be a JSON object")
    return body


def mutable_meta(meta: Obj) -> Obj:
    """Metadata fields a client may change with update/patch (the server owns uid, creation time...)."""
    keep = ("labels", "annotations", "ownerReferences", "finalizers", "resourceVersion")
    return {k: v for k, v in meta.items() if k in keep}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null removes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(doc: Obj, ops: Any, path: str) -> Obj:
    """RFC 6902 JSON patch: add, remove, replace, test."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        parent: Any = doc
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent.setdefault(token, {})
        last = tokens[-1]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"the test operation on {op['path']} failed")
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            elif last in parent:
                del parent[last]
            else:
                raise ApiError(422, "Invalid", f"remove: {op['path']} does not exist")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        else:
            raise ApiError(400, "BadRequest", f"unsupported JSON patch operation {kind!r}")
    return doc


def scale_of(obj: Obj) -> Obj:
    labels = obj["spec"].get("selector", {}).get("matchLabels", {})
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "uid": obj["metadata"]["uid"],
            "resourceVersion": obj["metadata"]["resourceVersion"],
            "creationTimestamp": obj["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": int(obj["spec"].get("replicas", 1))},
        "status": {
            "replicas": int(obj.get("status", {}).get("replicas", 0)),
            "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        },
    }


def pod_ready(pod: Obj) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def removal_candidate(pod: Obj) -> lifecycle.RemovalCandidate:
    """What the ReplicaSet ranks a pod object by, for `emulation.lifecycle.pods_to_delete`."""
    meta, status = pod["metadata"], pod.get("status", {})
    ready_at = next(
        (
            c.get("lastTransitionTime")
            for c in status.get("conditions", [])
            if c.get("type") == "Ready" and c.get("status") == "True"
        ),
        None,
    )
    phase = status.get("phase", "Pending")
    return lifecycle.RemovalCandidate(
        name=meta["name"],
        node=pod["spec"].get("nodeName") or None,
        phase=phase if phase in ("Pending", "Unknown", "Running") else "Unknown",
        ready_s=_unix_s(ready_at) if pod_ready(pod) else None,
        created_s=_unix_s(meta.get("creationTimestamp")),
        deletion_cost=lifecycle.deletion_cost(meta.get("annotations") or {}),
        restarts=max((int(c.get("restartCount", 0)) for c in status.get("containerStatuses", [])), default=0),
        uid=str(meta.get("uid", "")),
    )


def _unix_s(stamp: str | None) -> float:
    """An RFC 3339 timestamp as Unix seconds; 0 when missing."""
    if not stamp:
        return 0.0
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def selector_matcher(labels: str | None, fields: str | None) -> Callable[[Obj], bool]:
    tests: list[Callable[[Obj], bool]] = []
    for term in _split_terms(labels or ""):
        tests.append(_label_term(term))
    for term in [t for t in (fields or "").split(",") if t]:
        negate = "!=" in term
        path, value = re.split(r"!=|==|=", term, maxsplit=1)

        def field_test(obj: Obj, path: str = path, value: str = value, negate: bool = negate) -> bool:
            cur: Any = obj
            for key in path.split("."):
                cur = cur.get(key) if isinstance(cur, dict) else None
            return (str(cur if cur is not None else "") == value) != negate

        tests.append(field_test)
    return lambda obj: all(t(obj) for t in tests)


def _split_terms(selector: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "," and depth == 0:
            terms.append(cur.strip())
            cur = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        cur += ch
    if cur.strip():
        terms.append(cur.strip())
    return terms


def _label_term(term: str) -> Callable[[Obj], bool]:
    def labels(obj: Obj) -> dict[str, str]:
        return obj.get("metadata", {}).get("labels") or {}

    if m := re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s+\((.*)\)", term):
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
        return lambda o: (labels(o).get(key) in values) == (op == "in")
    if m := re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*(\S*)", term):
        key, op, value = m.groups()
        return lambda o: (labels(o).get(key) == value) != (op == "!=")
    if term.startswith("!"):
        return lambda o: term[1:] not in labels(o)
    return lambda o: term in labels(o)
