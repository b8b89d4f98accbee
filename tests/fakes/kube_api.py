"""An in-test Kubernetes API server: aiohttp on 127.0.0.1, the real REST paths, driven by the real client.

Why a fake server and not mocks: the controller talks to Kubernetes only through the official `kubernetes`
client, so the seam worth testing is the HTTP one. The client builds real URLs, query strings, patch content
types and bodies; this server answers the way kube-apiserver does for the resources Forestall uses:

- get / list / watch (`?watch=true`, newline-delimited events) with one monotonic `resourceVersion` per
  server, replay from a given version, `410 Expired` for versions older than the kept history, and `BOOKMARK`
  events when `allowWatchBookmarks=true` (after the initial events, periodically, and before closing);
- create (409 AlreadyExists, `generateName`), update (PUT; 409 Conflict on a stale `metadata.resourceVersion`),
  patch (`merge-patch+json`, `strategic-merge-patch+json` treated as a merge patch, which is exact for the
  maps Forestall patches, and `json-patch+json`), delete;
- the `status` subresource (CRDs, workloads) and the `scale` subresource of Deployments and StatefulSets
  (autoscaling/v1 `Scale`), discovery documents (`/api`, `/apis`, `/apis/{group}/{version}`) so clients can
  find which version of a group is served;
- errors as real `Status` objects (404 NotFound, 409 Conflict/AlreadyExists, 422 Invalid, 410 Expired).

Every object written is validated before it is stored: built-in kinds against the Kubernetes OpenAPI schemas
shipped by `kubernetes-validate` (strict, `KUBE_VERSION`), the ScalingPolicy against the CRD generated from
`controller.policy` and the cluster-autoscaler kinds (CapacityBuffer, ProvisioningRequest) against compact
structural schemas written from their published CRDs, both through `tests.fakes.crd_schema` (defaults, unknown
fields, CEL rules). An invalid body gets 422 Invalid with the causes, as kube-apiserver answers.

Every resource request is recorded in `recorded_calls` (verb, group, version, resource, subresource,
namespace, name), and `rbac_rules()` turns them into the `(apiGroup, resource[/subresource], verb)` set that a
least-privilege Role must grant; `tests` of the manifests compare the two.

It also plays the ReplicaSet controller and the kubelet on request (`run_workloads()`, `set_pod_state()`),
deterministically, so tests decide when pods appear, become Ready and go away. Scale-down removes the pods
with the lowest `controller.kubernetes.io/pod-deletion-cost` first, as the ReplicaSet controller does.

What it does not do: authentication, admission webhooks, server-side apply, garbage collection, pagination
(`limit` is ignored and everything is returned), or field selectors beyond simple `path=value` / `path!=value`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jsonschema
from aiohttp import web
from kubernetes_validate import utils as kv_utils

from balancer import clock as clock_mod
from controller import crd as crd_mod
from tests.fakes import crd_schema

KUBE_VERSION = "1.34"
"""Kubernetes version whose schemas validate built-in kinds (kubernetes-validate, strict)."""

BOOKMARK_INTERVAL_S = 1.0
"""Real seconds between BOOKMARK events on an idle watch; kube-apiserver sends one about every minute."""

HISTORY_LIMIT = 50_000
"""Watch events kept for replay; older resourceVersions answer 410 Expired (etcd compaction)."""

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    """One REST resource the server serves."""

    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ()
    crd_schema: Obj | None = None
    """Structural schema for custom resources; built-in kinds validate with kubernetes-validate."""

    @property
    def storage_version(self) -> str:
        return self.versions[-1]

    def api_version(self, version: str | None = None) -> str:
        version = version or self.storage_version
        return f"{self.group}/{version}" if self.group else version


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

    def __init__(self, code: int, reason: str, message: str, *, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

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


# --- schemas of the cluster-autoscaler kinds (written from the published CRDs, structural) ----------------

_CONDITIONS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["lastTransitionTime", "message", "reason", "status", "type"],
        "properties": {
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "message": {"type": "string", "maxLength": 32768},
            "observedGeneration": {"type": "integer", "minimum": 0},
            "reason": {"type": "string", "minLength": 1, "maxLength": 1024},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "type": {"type": "string", "maxLength": 316},
        },
    },
}
_NAME_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}},
}
_TOP = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}

CAPACITY_BUFFER_SCHEMA: Obj = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        **_TOP,
        "spec": {
            "type": "object",
            "properties": {
                "limits": {"type": "object", "additionalProperties": {"type": ["integer", "string"]}},
                "percentage": {"type": "integer", "minimum": 0},
                "podTemplateRef": _NAME_REF,
                "provisioningStrategy": {"type": "string", "default": "buffer.x-k8s.io/active-capacity"},
                "replicas": {"type": "integer", "minimum": 0},
                "scalableRef": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "properties": {
                        "apiGroup": {"type": "string"},
                        "kind": {"type": "string", "minLength": 1},
                        "name": {"type": "string", "minLength": 1},
                    },
                },
            },
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.podTemplateRef) || has(self.replicas) || has(self.limits)",
                    "message": "If podTemplateRef is set, replicas or limits must also be set",
                },
                {
                    "rule": "!(has(self.podTemplateRef) && has(self.scalableRef))",
                    "message": "podTemplateRef and scalableRef are mutually exclusive",
                },
            ],
        },
        "status": {
            "type": "object",
            "properties": {
                "conditions": _CONDITIONS,
                "podTemplateRef": _NAME_REF,
                "provisioningStrategy": {"type": "string"},
                "replicas": {"type": "integer"},
            },
        },
    },
}

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PROVISIONING_REQUEST_SCHEMA: Obj = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        **_TOP,
        "spec": {
            "type": "object",
            "required": ["podSets", "provisioningClassName"],
            "properties": {
                "parameters": {
                    "type": "object",
                    "maxProperties": 100,
                    "additionalProperties": {"type": "string", "maxLength": 255},
                },
                "podSets": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 32,
                    "items": {
                        "type": "object",
                        "required": ["count", "podTemplateRef"],
                        "properties": {
                            "count": {"type": "integer", "minimum": 1},
                            "podTemplateRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN}
                                },
                            },
                        },
                    },
                },
                "provisioningClassName": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
            },
        },
        "status": {
            "type": "object",
            "properties": {
                "conditions": _CONDITIONS,
                "provisioningClassDetails": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    },
}
"""The spec is immutable (`self == oldSelf` in the real CRD): the server refuses spec changes on update."""

_NODEPOOL_SCHEMA: Obj = {
    "type": "object",
    "properties": {**_TOP, "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
}


def default_resources(*, capacity_buffer_versions: Iterable[str] = ("v1beta1",)) -> list[ResourceType]:
    """Every resource the controller and balancer use. CapacityBuffer is served at the versions given."""
    policy_schema = crd_schema.crd_schema(crd_mod.definition())
    return [
        ResourceType("", ("v1",), "pods", "Pod", subresources=("status",)),
        ResourceType("", ("v1",), "nodes", "Node", namespaced=False, subresources=("status",)),
        ResourceType("", ("v1",), "events", "Event"),
        ResourceType("", ("v1",), "podtemplates", "PodTemplate"),
        ResourceType("", ("v1",), "services", "Service", subresources=("status",)),
        ResourceType("", ("v1",), "namespaces", "Namespace", namespaced=False),
        ResourceType("apps", ("v1",), "deployments", "Deployment", subresources=("status", "scale")),
        ResourceType("apps", ("v1",), "statefulsets", "StatefulSet", subresources=("status", "scale")),
        ResourceType("coordination.k8s.io", ("v1",), "leases", "Lease"),
        ResourceType("events.k8s.io", ("v1",), "events", "Event"),
        ResourceType("discovery.k8s.io", ("v1",), "endpointslices", "EndpointSlice"),
        ResourceType("scheduling.k8s.io", ("v1",), "priorityclasses", "PriorityClass", namespaced=False),
        ResourceType(
            "forestall.dev",
            ("v1alpha1",),
            "scalingpolicies",
            "ScalingPolicy",
            subresources=("status",),
            crd_schema=policy_schema,
        ),
        ResourceType(
            "autoscaling.x-k8s.io",
            tuple(capacity_buffer_versions),
            "capacitybuffers",
            "CapacityBuffer",
            subresources=("status",),
            crd_schema=CAPACITY_BUFFER_SCHEMA,
        ),
        ResourceType(
            "autoscaling.x-k8s.io",
            ("v1",),
            "provisioningrequests",
            "ProvisioningRequest",
            subresources=("status",),
            crd_schema=PROVISIONING_REQUEST_SCHEMA,
        ),
        ResourceType("karpenter.sh", ("v1",), "nodepools", "NodePool", False, ("status",), _NODEPOOL_SCHEMA),
        ResourceType(
            "karpenter.sh", ("v1",), "nodeclaims", "NodeClaim", False, ("status",), _NODEPOOL_SCHEMA
        ),
    ]


@functools.cache
def _builtin_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """The strict kubernetes-validate schema for a kind, loaded once (the library reloads it on every call)."""
    from referencing import Registry, Resource

    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= KUBE_VERSION][-1]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", KUBE_VERSION)
    defs = kv_utils.schema_contents(f"{folder}/_definitions.json", KUBE_VERSION)
    registry: Registry[Any] = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate_builtin(obj: Obj) -> list[str]:
    """Problems kubernetes-validate (strict) finds in a built-in object; empty when valid."""
    validator = _builtin_validator(obj.get("apiVersion", ""), obj.get("kind", ""))
    return [
        f"{'.'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


class FakeKubeApi:
    """The server. `async with FakeKubeApi() as api:` then point a client at `api.url`."""

    def __init__(
        self,
        *,
        clock: clock_mod.Clock = clock_mod.SYSTEM,
        resources: list[ResourceType] | None = None,
        bookmark_interval_s: float = BOOKMARK_INTERVAL_S,
        record: bool = True,
    ) -> None:
        self.clock = clock
        self.resources = resources if resources is not None else default_resources()
        self.bookmark_interval_s = bookmark_interval_s
        self.record = record
        self.recorded_calls: list[ApiCall] = []
        self.nonresource_calls: list[tuple[str, str]] = []
        self.rejected: list[tuple[str, list[str]]] = []
        """(path, problems) of every write refused with 422, so tests can show nothing invalid slipped by."""
        self.store: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self._rv = itertools.count(1)
        self.resource_version = 0
        self._history: list[tuple[int, str, ResourceType, Obj]] = []
        self._watchers: set[asyncio.Queue[tuple[str, ResourceType, Obj] | None]] = set()
        self._injected: list[tuple[str, re.Pattern[str], int, int]] = []
        self._runner: web.AppRunner | None = None
        self._skip_validation = False
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeKubeApi:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for queue in list(self._watchers):
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def client_configuration(self) -> Any:
        """A `kubernetes.client.Configuration` pointing at this server."""
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return config

    # --- what tests use ----------------------------------------------------------------------------------

    def rbac_rules(self) -> set[tuple[str, str, str]]:
        """`(apiGroup, resource[/subresource], verb)` for every recorded resource request."""
        return {
            (c.group, f"{c.resource}/{c.subresource}" if c.subresource else c.resource, c.verb)
            for c in self.recorded_calls
        }

    def calls(
        self, verb: str | None = None, resource: str | None = None, subresource: str | None = "*"
    ) -> list[ApiCall]:
        """Recorded calls filtered by verb, resource and subresource (`"*"`: any)."""
        return [
            c
            for c in self.recorded_calls
            if (verb is None or c.verb == verb)
            and (resource is None or c.resource == resource)
            and (subresource == "*" or c.subresource == subresource)
        ]

    def inject_error(self, method: str, path_regex: str, status: int, *, times: int = 1) -> None:
        """Answer the next `times` requests matching method and path with `status` (500, 503, 409, 429...)."""
        self._injected.append((method.upper(), re.compile(path_regex), status, times))

    def resource(self, group: str, plural: str) -> ResourceType:
        for rt in self.resources:
            if rt.group == group and rt.plural == plural:
                return rt
        raise KeyError(f"{group}/{plural} not served")

    def get(self, group: str, plural: str, namespace: str, name: str) -> Obj | None:
        """The stored object (a copy), or None."""
        obj = self.store.get((group, plural), {}).get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, group: str, plural: str, namespace: str | None = None) -> list[Obj]:
        return [
            copy.deepcopy(o)
            for (ns, _), o in sorted(self.store.get((group, plural), {}).items())
            if namespace is None or ns == namespace
        ]

    def put(self, obj: Obj, *, validate: bool = True) -> Obj:
        """Create or replace an object directly (test setup), validated and announced to watchers.

        `validate=False` stores an object the current schema would refuse, as one written under an older,
        looser CRD schema would be (the controller must still cope with it).
        """
        if not validate:
            self._skip_validation = True
            try:
                return self.put(obj)
            finally:
                self._skip_validation = False
        group, _, version = obj["apiVersion"].rpartition("/")
        rt = next(r for r in self.resources if r.group == group and r.kind == obj["kind"])
        ns = obj["metadata"].get("namespace", "default") if rt.namespaced else ""
        existing = self.store.get((group, rt.plural), {}).get((ns, obj["metadata"]["name"]))
        obj = copy.deepcopy(obj)
        if rt.namespaced:
            obj["metadata"]["namespace"] = ns
        if existing is None:
            return self._create(rt, version, ns, obj)
        obj["metadata"] = {**existing["metadata"], **obj["metadata"]}
        obj["metadata"].pop("resourceVersion", None)
        return self._replace(rt, existing, obj)

    def delete(self, group: str, plural: str, namespace: str, name: str) -> None:
        rt = self.resource(group, plural)
        obj = self.store.get((group, plural), {}).pop((namespace, name))
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._announce("DELETED", rt, obj)

    def compact(self) -> None:
        """Forget all watch history (like etcd compaction): older resourceVersions now answer 410."""
        self._history.clear()

    # --- the ReplicaSet controller and the kubelet, run when the test says ----------------------------------

    def run_workloads(self, *, namespace: str | None = None) -> None:
        """Make every Deployment's and StatefulSet's pods match its spec.replicas (one pass)."""
        for plural in ("deployments", "statefulsets"):
            for owner in self.objects("apps", plural, namespace):
                self._reconcile_workload(owner)

    def set_pod_state(
        self,
        namespace: str,
        name: str,
        *,
        node: str | None = None,
        running: bool = False,
        ready: bool | None = None,
    ) -> Obj:
        """At the clock's time: bind a pod to a node (PodScheduled), start its containers, set Ready."""
        pod = self.get("", "pods", namespace, name)
        if pod is None:
            raise KeyError(f"pod {namespace}/{name} not found")
        now = clock_mod.utc_iso(self.clock.now())
        conditions = {c["type"]: c for c in pod.setdefault("status", {}).get("conditions", [])}
        if node is not None:
            pod["spec"]["nodeName"] = node
            pod["status"]["phase"] = "Running"
            pod["status"].setdefault("startTime", now)
            conditions["PodScheduled"] = {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}
        if running:
            pod["status"]["containerStatuses"] = [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": bool(ready),
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": now}},
                }
                for c in pod["spec"]["containers"]
            ]
        if ready is not None:
            status = "True" if ready else "False"
            for kind in ("Ready", "ContainersReady"):
                conditions[kind] = {"type": kind, "status": status, "lastTransitionTime": now}
        pod["status"]["conditions"] = list(conditions.values())
        return self.put(pod)

    def _reconcile_workload(self, owner: Obj) -> None:
        ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
        want = int(owner["spec"].get("replicas", 1))
        labels = owner["spec"]["selector"].get("matchLabels", {})
        pods = [
            p
            for p in self.objects("", "pods", ns)
            if any(
                ref.get("uid") == owner["metadata"]["uid"] for ref in p["metadata"].get("ownerReferences", [])
            )
            and "deletionTimestamp" not in p["metadata"]
        ]
        if len(pods) > want:
            for pod in sorted(pods, key=_removal_rank)[: len(pods) - want]:
                self.delete("", "pods", ns, pod["metadata"]["name"])
        template = owner["spec"]["template"]
        taken = {p["metadata"]["name"] for p in pods}
        for index in itertools.count():
            if len(pods) >= want:
                break
            pod_name = (
                f"{name}-{index}" if owner["kind"] == "StatefulSet" else f"{name}-{uuid.uuid4().hex[:5]}"
            )
            if pod_name in taken:
                continue
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": ns,
                    "labels": {**template.get("metadata", {}).get("labels", {}), **labels},
                    "annotations": dict(template.get("metadata", {}).get("annotations", {})),
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": owner["kind"],
                            "name": name,
                            "uid": owner["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": copy.deepcopy(template["spec"]),
                "status": {"phase": "Pending", "conditions": []},
            }
            pods.append(self.put(pod))
        ready = sum(1 for p in pods if _pod_ready(p))
        status = {"replicas": len(pods), "readyReplicas": ready, "availableReplicas": ready}
        if owner.get("status") != status:
            fresh = self.get("apps", _plural(owner["kind"]), ns, name)
            if fresh is not None:
                fresh["status"] = status
                self.put(fresh)

    # --- HTTP ---------------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as err:
            return web.json_response(err.status(), status=err.code)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if (parts[:1] == ["api"] and len(parts) <= 2) or (parts[:1] == ["apis"] and len(parts) <= 3):
            self.nonresource_calls.append((request.method, request.path))
            return web.json_response(self._discovery(parts))
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) > 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = (
            rest[0],
            (rest[1] if len(rest) > 1 else None),
            (rest[2] if len(rest) > 2 else None),
        )
        rt = next((r for r in self.resources if r.group == group and r.plural == plural), None)
        if rt is None or version not in rt.versions or (sub is not None and sub not in rt.subresources):
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        if namespace is not None and not rt.namespaced:
            raise ApiError(404, "NotFound", f"{plural} is not namespaced")
        query = request.query
        verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[
            request.method
        ]
        if name is None and verb == "get":
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
        call = ApiCall(verb, group, version, plural, sub, namespace, name)
        if verb == "watch" and self.record:
            # a watch answers when it ends, maybe after the test looked: record it as it starts
            self.recorded_calls.append(dataclass_replace(call, status=200))
        try:
            self._maybe_inject(request)
            response = await self._serve(request, rt, version, namespace, name, sub, verb)
        except ApiError as err:
            if self.record:
                self.recorded_calls.append(dataclass_replace(call, status=err.code))
            raise
        if self.record and verb != "watch":
            self.recorded_calls.append(dataclass_replace(call, status=response.status))
        return response

    async def _serve(
        self,
        request: web.Request,
        rt: ResourceType,
        version: str,
        namespace: str | None,
        name: str | None,
        sub: str | None,
        verb: str,
    ) -> web.StreamResponse:
        query = request.query
        if verb == "watch":
            return await self._watch(request, rt, version, namespace)
        if verb == "list":
            items = self._select(rt, namespace, query.get("labelSelector"), query.get("fieldSelector"))
            return web.json_response(
                {
                    "apiVersion": rt.api_version(version),
                    "kind": f"{rt.kind}List",
                    "metadata": {"resourceVersion": str(self.resource_version)},
                    "items": [self._at_version(o, rt, version) for o in items],
                }
            )
        ns = namespace or ""
        if verb == "create":
            if name is not None:
                raise ApiError(405, "MethodNotAllowed", "POST to a named object is not allowed")
            body = await _json_body(request)
            self._check_kind(rt, version, body)
            if rt.namespaced:
                body.setdefault("metadata", {})["namespace"] = ns
            created = self._create(rt, version, ns, body, path=request.path)
            return web.json_response(self._at_version(created, rt, version), status=201)
        assert name is not None
        current = self.store.get((rt.group, rt.plural), {}).get((ns, name))
        if current is None:
            raise ApiError(
                404,
                "NotFound",
                f'{rt.plural}{"." + rt.group if rt.group else ""} "{name}" not found',
                details={"name": name, "group": rt.group, "kind": rt.plural},
            )
        if verb == "get":
            out = _scale_of(current) if sub == "scale" else self._at_version(current, rt, version)
            return web.json_response(out)
        if verb == "delete":
            self.delete(rt.group, rt.plural, ns, name)
            return web.json_response(self._at_version(current, rt, version))
        body = await _json_body(request) if verb == "update" else None
        if verb == "patch":
            ctype = request.content_type
            patch = json.loads(await request.text() or "null")
            base = _scale_of(current) if sub == "scale" else copy.deepcopy(current)
            if ctype == "application/json-patch+json":
                body = _json_patch(base, patch, request.path)
            elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                # A resourceVersion in the patch is a precondition, as in kube-apiserver.
                body = _merge_patch(base, patch)
                if "resourceVersion" not in patch.get("metadata", {}):
                    body.setdefault("metadata", {})["resourceVersion"] = current["metadata"][
                        "resourceVersion"
                    ]
            else:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}"
                )
        assert body is not None
        sent_rv = body.get("metadata", {}).get("resourceVersion")
        if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.plural} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                details={"name": name, "group": rt.group, "kind": rt.plural},
            )
        if sub == "scale":
            self._check(
                rt.group, {"apiVersion": "autoscaling/v1", "kind": "Scale", **body}, request.path, None
            )
            new = copy.deepcopy(current)
            new["spec"]["replicas"] = int(body.get("spec", {}).get("replicas", 0))
            stored = self._replace(rt, current, new, path=request.path)
            return web.json_response(_scale_of(stored))
        self._check_kind(rt, version, body)
        new = copy.deepcopy(body)
        new["metadata"] = {**current["metadata"], **_mutable_meta(body.get("metadata", {}))}
        if sub == "status":
            new = {**copy.deepcopy(current), "status": body.get("status")}
            new["metadata"] = current["metadata"]
        elif "status" in rt.subresources:
            new["status"] = copy.deepcopy(current.get("status"))
            if new["status"] is None:
                new.pop("status")
        stored = self._replace(rt, current, new, path=request.path)
        return web.json_response(self._at_version(stored, rt, version))

    def _maybe_inject(self, request: web.Request) -> None:
        for index, (method, pattern, status, times) in enumerate(self._injected):
            if method == request.method and pattern.search(request.path):
                if times <= 1:
                    del self._injected[index]
                else:
                    self._injected[index] = (method, pattern, status, times - 1)
                message = f"injected {status}"
                if status == 409:
                    message = "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again"
                raise ApiError(status, _REASONS.get(status, "InternalError"), message)

    # --- storage ------------------------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self.resource_version = next(self._rv)
        return str(self.resource_version)

    def _create(self, rt: ResourceType, version: str, ns: str, body: Obj, *, path: str = "") -> Obj:
        meta = body.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(
                    422, "Invalid", "metadata.name: Required value: name or generateName is required"
                )
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta["name"]
        bucket = self.store.setdefault((rt.group, rt.plural), {})
        if (ns, name) in bucket:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rt.plural}{"." + rt.group if rt.group else ""} "{name}" already exists',
                details={"name": name, "group": rt.group, "kind": rt.plural},
            )
        body["apiVersion"] = rt.api_version(version)
        body["kind"] = rt.kind
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=meta.get("creationTimestamp") or clock_mod.utc_iso(self.clock.now()),
        )
        meta.pop("resourceVersion", None)
        if "spec" in body:
            meta["generation"] = 1
        body = self._check(rt.group, body, path or f"create {rt.plural}", rt)
        meta = body["metadata"]
        meta["resourceVersion"] = self._next_rv()
        bucket[(ns, name)] = body
        self._announce("ADDED", rt, body)
        return copy.deepcopy(body)

    def _replace(self, rt: ResourceType, current: Obj, new: Obj, *, path: str = "") -> Obj:
        if rt.plural == "provisioningrequests" and new.get("spec") != current.get("spec"):
            raise ApiError(422, "Invalid", "spec: Invalid value: Value is immutable")
        new = self._check(rt.group, new, path or f"update {rt.plural}", rt, old=current)
        if new.get("spec") != current.get("spec"):
            new["metadata"]["generation"] = int(current["metadata"].get("generation", 0)) + 1
        if new == current and path:
            return copy.deepcopy(current)  # no-op writes keep the resourceVersion, as kube-apiserver does
        new["metadata"]["resourceVersion"] = self._next_rv()
        ns, name = new["metadata"].get("namespace", ""), new["metadata"]["name"]
        self.store[(rt.group, rt.plural)][(ns, name)] = new
        self._announce("MODIFIED", rt, new)
        return copy.deepcopy(new)

    def _check(
        self, group: str, obj: Obj, path: str, rt: ResourceType | None, *, old: Obj | None = None
    ) -> Obj:
        """Validate (and for CRDs default) an object; 422 Invalid with the causes when it is not valid.

        For custom resources an update is checked with validation ratcheting (GA in Kubernetes 1.33): a
        problem the stored object already had is not held against the update, so a status write to an
        object stored under a looser schema goes through.
        """
        problems: list[str] = []
        if self._skip_validation:
            return obj
        name = obj.get("metadata", {}).get("name", "")
        if rt is not None and name and (not re.match(_DNS_SUBDOMAIN, name) or len(name) > 253):
            problems.append(f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain")
        if rt is not None and rt.crd_schema is not None:
            obj = crd_schema.apply_defaults(rt.crd_schema, copy.deepcopy(obj))
            found = crd_schema.validate(rt.crd_schema, obj)
            if old is not None:
                before = set(crd_schema.validate(rt.crd_schema, old))
                found = [p for p in found if p not in before]
            problems += found
        else:
            problems += validate_builtin(obj)
        if problems:
            self.rejected.append((path, problems))
            raise ApiError(
                422,
                "Invalid",
                f'{obj.get("kind")} "{name}" is invalid: ' + "; ".join(problems),
                details={
                    "name": name,
                    "group": group,
                    "kind": obj.get("kind"),
                    "causes": [{"reason": "FieldValueInvalid", "message": p} for p in problems],
                },
            )
        return obj

    def _check_kind(self, rt: ResourceType, version: str, body: Obj) -> None:
        if body.get("kind") not in (None, rt.kind) or body.get("apiVersion") not in (
            None,
            rt.api_version(version),
        ):
            raise ApiError(
                400,
                "BadRequest",
                f"the body is {body.get('apiVersion')}/{body.get('kind')}, the path is {rt.api_version(version)} {rt.kind}",
            )
        body["apiVersion"], body["kind"] = rt.api_version(version), rt.kind

    def _at_version(self, obj: Obj, rt: ResourceType, version: str) -> Obj:
        if obj.get("apiVersion") == rt.api_version(version):
            return obj
        return {**obj, "apiVersion": rt.api_version(version)}

    def _select(
        self, rt: ResourceType, namespace: str | None, labels: str | None, fields: str | None
    ) -> list[Obj]:
        match = _selector(labels, fields)
        return [
            o
            for (ns, _), o in sorted(self.store.get((rt.group, rt.plural), {}).items())
            if (namespace is None or ns == namespace) and match(o)
        ]

    # --- watch --------------------------------------------------------------------------------------------

    def _announce(self, kind: str, rt: ResourceType, obj: Obj) -> None:
        snapshot = copy.deepcopy(obj)
        self._history.append((int(obj["metadata"]["resourceVersion"]), kind, rt, snapshot))
        if len(self._history) > HISTORY_LIMIT:
            del self._history[: len(self._history) - HISTORY_LIMIT]
        for queue in self._watchers:
            queue.put_nowait((kind, rt, snapshot))

    async def _watch(
        self, request: web.Request, rt: ResourceType, version: str, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        match = _selector(query.get("labelSelector"), query.get("fieldSelector"))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout_s = float(query.get("timeoutSeconds", 1800))
        since = query.get("resourceVersion", "")
        queue: asyncio.Queue[tuple[str, ResourceType, Obj] | None] = asyncio.Queue()
        self._watchers.add(queue)  # before replaying, so nothing announced meanwhile is lost
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        sent_rv = 0

        def wanted(kind_rt: ResourceType, obj: Obj) -> bool:
            ns = obj["metadata"].get("namespace")
            return kind_rt is rt and (namespace is None or ns == namespace) and match(obj)

        async def send(kind: str, obj: Obj) -> None:
            nonlocal sent_rv
            sent_rv = max(sent_rv, int(obj["metadata"]["resourceVersion"]))
            line = json.dumps({"type": kind, "object": self._at_version(obj, rt, version)})
            await resp.write(line.encode() + b"\n")

        async def bookmark(initial_end: bool = False) -> None:
            meta: Obj = {"resourceVersion": str(max(sent_rv, self.resource_version))}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            line = json.dumps(
                {
                    "type": "BOOKMARK",
                    "object": {"apiVersion": rt.api_version(version), "kind": rt.kind, "metadata": meta},
                }
            )
            await resp.write(line.encode() + b"\n")

        try:
            if since in ("", "0"):
                for obj in self._select(
                    rt, namespace, query.get("labelSelector"), query.get("fieldSelector")
                ):
                    await send("ADDED", obj)
                sent_rv = self.resource_version
            else:
                start = int(since)
                if start < self.resource_version and (not self._history or self._history[0][0] > start + 1):
                    await resp.write(
                        json.dumps(
                            {
                                "type": "ERROR",
                                "object": ApiError(
                                    410, "Expired", f"too old resource version: {start}"
                                ).status(),
                            }
                        ).encode()
                        + b"\n"
                    )
                    return resp
                sent_rv = start
                for rv, kind, kind_rt, obj in list(self._history):
                    if rv > start and wanted(kind_rt, obj):
                        await send(kind, obj)
                sent_rv = max(sent_rv, self.resource_version)
            if bookmarks:
                await bookmark(initial_end=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(remaining, self.bookmark_interval_s)):
                        item = await queue.get()
                except TimeoutError:
                    if bookmarks:
                        await bookmark()
                    continue
                if item is None:
                    break
                kind, kind_rt, obj = item
                if int(obj["metadata"]["resourceVersion"]) > sent_rv and wanted(kind_rt, obj):
                    await send(kind, obj)
            if bookmarks:
                await bookmark()
        except ConnectionResetError:
            return resp  # the client went away
        finally:
            self._watchers.discard(queue)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    # --- discovery ----------------------------------------------------------------------------------------

    def _discovery(self, parts: list[str]) -> Obj:
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        groups: dict[str, list[str]] = {}
        for rt in self.resources:
            if rt.group:
                for v in rt.versions:
                    if v not in groups.setdefault(rt.group, []):
                        groups[rt.group].append(v)

        def group_doc(name: str) -> Obj:
            versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in groups[name]]
            return {"name": name, "versions": versions, "preferredVersion": versions[-1]}

        if parts == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_doc(g) for g in groups]}
        if len(parts) == 2:
            if parts[1] not in groups:
                raise ApiError(404, "NotFound", f"group {parts[1]} not served")
            return {"kind": "APIGroup", "apiVersion": "v1", **group_doc(parts[1])}
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        served = [rt for rt in self.resources if rt.group == group and version in rt.versions]
        if not served:
            raise ApiError(404, "NotFound", f"{group}/{version} not served")
        resources = []
        for rt in served:
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append(
                {
                    "name": rt.plural,
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": verbs,
                    "singularName": "",
                }
            )
            for sub in rt.subresources:
                kind = "Scale" if sub == "scale" else rt.kind
                resources.append(
                    {
                        "name": f"{rt.plural}/{sub}",
                        "namespaced": rt.namespaced,
                        "kind": kind,
                        "verbs": ["get", "patch", "update"],
                        "singularName": "",
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }


# --- helpers ---------------------------------------------------------------------------------------------

_REASONS = {
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


def _plural(kind: str) -> str:
    return {"Deployment": "deployments", "StatefulSet": "statefulsets"}[kind]


async def _json_body(request: web.Request) -> Obj:
    try:
        body = json.loads(await request.text())
    except json.JSONDecodeError as exc:
        raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the body must be a JSON object")
    return body


def _mutable_meta(meta: Obj) -> Obj:
    """Metadata fields a client may change with update/patch (the server owns uid, creation time...)."""
    keep = ("labels", "annotations", "ownerReferences", "finalizers", "resourceVersion")
    return {k: v for k, v in meta.items() if k in keep}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null removes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _json_patch(doc: Obj, ops: Any, path: str) -> Obj:
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


def _scale_of(obj: Obj) -> Obj:
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


def _pod_ready(pod: Obj) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def _removal_rank(pod: Obj) -> tuple[int, int, int, str]:
    """ReplicaSet scale-down order: unscheduled, then not ready, then lowest pod-deletion-cost, then newest."""
    cost = int(pod["metadata"].get("annotations", {}).get("controller.kubernetes.io/pod-deletion-cost", "0"))
    created = pod["metadata"].get("creationTimestamp", "")
    newest_first = "".join(chr(0x10FFFF - ord(c)) for c in created)
    return (1 if pod["spec"].get("nodeName") else 0, 1 if _pod_ready(pod) else 0, cost, newest_first)


def _selector(labels: str | None, fields: str | None) -> Callable[[Obj], bool]:
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


async def eventually(check: Callable[[], bool], what: str, *, timeout_s: float = 10.0) -> None:
    """Wait until a condition fed by another thread (a watch, the controller) holds; fail naming `what`.

    This waits for an outcome, it does not race one: the condition is checked at every turn of the event
    loop, and the timeout only bounds a test that would otherwise hang.
    """
    steps = int(timeout_s / 0.01)
    for _ in range(steps):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


async def advance_until(
    clock: clock_mod.FakeClock, check: Callable[[], bool], what: str, *, step_s: float, max_steps: int = 100
) -> None:
    """Move a FakeClock in steps until `check` holds: for sleepers that may register after a given advance.

    After each step the event loop gets up to half a second of real time to react before the next step, so
    fake time never runs ahead by more than one step of what the code under test has seen.
    """
    for _ in range(max_steps):
        if check():
            return
        clock.advance(step_s)
        for _ in range(50):
            if check():
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"{what}: not reached after {max_steps} steps of {step_s:g} s")


# --- object builders for tests ------------------------------------------------------------------------------


def deployment(
    name: str, namespace: str = "llm", *, replicas: int = 2, gpus: int = 1, kind: str = "Deployment"
) -> Obj:
    """A GPU worker Deployment (or StatefulSet) whose pods carry `app=<name>`."""
    spec: Obj = {
        "replicas": replicas,
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [
                    {
                        "name": "vllm",
                        "image": "vllm/vllm-openai:v0.6.0",
                        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                    }
                ],
            },
        },
    }
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def scaling_policy(name: str, namespace: str = "llm", *, target: str | None = None, **spec: Any) -> Obj:
    """A valid ScalingPolicy for Deployment `target` (default: the policy's name); `spec` overrides fields."""
    body: Obj = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target or name},
        "demand": {
            "prometheus": {"query": f'sum(forestall_balancer_active_streams{{namespace="{namespace}"}})'}
        },
        "capacity": {"streamsPerReplica": 10, "gpusPerReplica": 1, "gpusPerNode": 8},
        "replicas": {"min": 1, "max": 20},
    }
    body.update(spec)
    return {
        "apiVersion": "forestall.dev/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def gpu_node(
    name: str, *, gpus: int = 8, ready: bool = True, created: str | None = None, ready_at: str | None = None
) -> Obj:
    """A GPU node offering `gpus` of nvidia.com/gpu."""
    conditions = [
        {
            "type": "Ready",
            "status": "True" if ready else "False",
            "lastTransitionTime": ready_at or created or "2026-01-01T00:00:00Z",
        }
    ]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"nvidia.com/gpu.present": "true"},
            **({"creationTimestamp": created} if created else {}),
        },
        "status": {
            "capacity": {"nvidia.com/gpu": str(gpus), "cpu": "96", "memory": "1Ti"},
            "allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "95", "memory": "1000Gi"},
            "conditions": conditions,
        },
    }
