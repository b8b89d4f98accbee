"""`FakeKubeApi`: the aiohttp server, its store, watches and discovery (see the package docstring)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from contract import clock as clock_mod
from emulation import lifecycle
from tests.fakes import crd_schema
from tests.fakes.kube_api import admission, cel_cost
from tests.fakes.kube_api.rest import (
    REASONS,
    ApiCall,
    ApiError,
    dataclass_replace,
    json_body,
    json_patch,
    merge_patch,
    mutable_meta,
    plural_of,
    pod_ready,
    removal_candidate,
    scale_of,
    selector_matcher,
)
from tests.fakes.kube_api.schemas import DNS_SUBDOMAIN, ResourceType, default_resources, validate_builtin

Obj = dict[str, Any]


BOOKMARK_INTERVAL_S = 1.0
"""Real seconds between BOOKMARK events on an idle watch; kube-apiserver sends one about every minute."""

HISTORY_LIMIT = 50_000
"""Watch events kept for replay; older resourceVersions answer 410 Expired (etcd compaction)."""

Obj = dict[str, Any]


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
        self.garbage_collected: list[tuple[str, str, str]] = []
        """(resource, namespace, name) of every object deleted because its owner went."""
        self.forbidden: list[tuple[str, list[str]]] = []
        """(path, problems) of every pod refused by Pod Security admission (403)."""
        self.store: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self._rv = itertools.count(1)
        self.resource_version = 0
        self._history: list[tuple[int, str, ResourceType, Obj]] = []
        self._watchers: set[asyncio.Queue[tuple[str, ResourceType, Obj] | None]] = set()
        self._injected: list[tuple[str, re.Pattern[str], int, int, float | None]] = []
        self._hangs: list[tuple[str, re.Pattern[str], int, re.Pattern[str]]] = []
        self._unhang = asyncio.Event()
        self.hung = 0
        """Requests currently held by `inject_hang`."""
        self._site: web.TCPSite | None = None
        self._down = False
        self._compacted_rv = 0
        """History before this version is gone: continue tokens from before it answer 410."""
        self._port = 0
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
        self._site = site
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self._port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._unhang.set()
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

    def inject_error(
        self, method: str, path_regex: str, status: int, *, times: int = 1, retry_after_s: float | None = None
    ) -> None:
        """Answer the next `times` requests matching method and path with `status` (500, 503, 409, 429...).

        `method` "*" matches every method. `retry_after_s` adds a `Retry-After` header (with 429, as the
        API server's priority-and-fairness throttling answers).
        """
        self._injected.append((method.upper(), re.compile(path_regex), status, times, retry_after_s))

    def inject_hang(self, method: str, path_regex: str, *, times: int = 1, query_regex: str = "") -> None:
        """Hold the next `times` matching requests (path, and query string when given) without answering
        until `release_hangs()` (or exit)."""
        self._unhang.clear()
        self._hangs.append((method.upper(), re.compile(path_regex), times, re.compile(query_regex)))

    def release_hangs(self) -> None:
        """Let every held request go on (it is then served normally)."""
        self._hangs.clear()
        self._unhang.set()

    def end_watches(self) -> None:
        """Close every open watch (as an API server restart does); clients resume from their last version."""
        for queue in list(self._watchers):
            queue.put_nowait(None)

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """A full outage: the listening socket closes (connections refused), open watches end; on exit the
        server listens again on the same port with its store intact (an API server restart)."""
        assert self._runner is not None and self._site is not None
        self.end_watches()
        self._down = True
        await self._site.stop()
        server = self._runner.server
        for handler in list(getattr(server, "_connections", {})):  # kept-alive connections die too
            handler.force_close()
            if handler.transport is not None:
                handler.transport.close()
        try:
            yield
        finally:
            self._down = False
            site = web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=True)
            await site.start()
            self._site = site

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
        """Delete as kube-apiserver does: an object with finalizers only gets a `deletionTimestamp` (and a
        new generation) and goes when its last finalizer is removed; then its dependents (ownerReferences
        naming its uid) are garbage-collected, in the background propagation order."""
        rt = self.resource(group, plural)
        current = self.store.get((group, plural), {}).get((namespace, name))
        if current is None:
            raise KeyError(f"{plural} {namespace}/{name} not found")
        meta = current["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = clock_mod.utc_iso(self.clock.now())
                marked["metadata"]["generation"] = int(meta.get("generation", 0)) + 1
                marked["metadata"]["resourceVersion"] = self._next_rv()
                self.store[(group, plural)][(namespace, name)] = marked
                self._announce("MODIFIED", rt, marked)
            return
        self._remove(rt, current)

    def _remove(self, rt: ResourceType, obj: Obj) -> None:
        meta = obj["metadata"]
        self.store[(rt.group, rt.plural)].pop((meta.get("namespace", ""), meta["name"]), None)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._announce("DELETED", rt, obj)
        self._collect(meta.get("uid"))

    def _collect(self, owner_uid: str | None) -> None:
        """Garbage collection: delete every object with an ownerReference to `owner_uid`."""
        if not owner_uid:
            return
        for (group, plural), bucket in list(self.store.items()):
            for (ns, name), obj in list(bucket.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    if (ns, name) in bucket:
                        self.garbage_collected.append((plural, ns, name))
                        self.delete(group, plural, ns, name)

    def compact(self) -> None:
        """Forget all watch history (like etcd compaction): older resourceVersions now answer 410."""
        self._history.clear()
        self._compacted_rv = self.resource_version

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
            candidates = [removal_candidate(p) for p in pods]
            for chosen in lifecycle.pods_to_delete(candidates, len(pods) - want, now_s=self.clock.now()):
                self.delete("", "pods", ns, chosen.name)
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
        ready = sum(1 for p in pods if pod_ready(p))
        status = {"replicas": len(pods), "readyReplicas": ready, "availableReplicas": ready}
        if owner.get("status") != status:
            fresh = self.get("apps", plural_of(owner["kind"]), ns, name)
            if fresh is not None:
                fresh["status"] = status
                self.put(fresh)

    # --- HTTP ---------------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._down and request.transport is not None:
            request.transport.close()  # a connection that slipped in during an outage is cut, not served
        try:
            return await self._route(request)
        except ApiError as err:
            return web.json_response(err.status(), status=err.code, headers=err.headers)

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
            await self._maybe_inject(request)
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
            limit = int(query.get("limit") or 0)
            list_rv, start = self.resource_version, 0
            if query.get("continue"):
                list_rv, start = _decode_continue(query["continue"])
                if list_rv < self._compacted_rv:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter.",
                    )
            page = items[start : start + limit] if limit else items[start:]
            meta: Obj = {"resourceVersion": str(list_rv)}
            if limit and start + limit < len(items):
                meta["continue"] = _encode_continue(list_rv, start + limit)
                meta["remainingItemCount"] = len(items) - start - limit
            return web.json_response(
                {
                    "apiVersion": rt.api_version(version),
                    "kind": f"{rt.kind}List",
                    "metadata": meta,
                    "items": [self._at_version(o, rt, version) for o in page],
                }
            )
        ns = namespace or ""
        if verb == "create":
            if name is not None:
                raise ApiError(405, "MethodNotAllowed", "POST to a named object is not allowed")
            body = await json_body(request)
            self._check_kind(rt, version, body)
            if rt.namespaced:
                body.setdefault("metadata", {})["namespace"] = ns
            if rt.plural == "pods" and not rt.group:
                self._admit_pod(ns, body, request.path)
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
            out = scale_of(current) if sub == "scale" else self._at_version(current, rt, version)
            return web.json_response(out)
        if verb == "delete":
            self.delete(rt.group, rt.plural, ns, name)
            return web.json_response(self._at_version(current, rt, version))
        body = await json_body(request) if verb == "update" else None
        if verb == "patch":
            ctype = request.content_type
            patch = json.loads(await request.text() or "null")
            base = scale_of(current) if sub == "scale" else copy.deepcopy(current)
            if ctype == "application/json-patch+json":
                body = json_patch(base, patch, request.path)
            elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                # A resourceVersion in the patch is a precondition, as in kube-apiserver.
                body = merge_patch(base, patch)
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
            return web.json_response(scale_of(stored))
        self._check_kind(rt, version, body)
        new = copy.deepcopy(body)
        # the server owns uid, timestamps...; the client's body says the rest (absent finalizers: none)
        owned = {k: v for k, v in current["metadata"].items() if k not in mutable_meta(current["metadata"])}
        new["metadata"] = {**owned, **mutable_meta(body.get("metadata", {}))}
        if sub == "status":
            new = {**copy.deepcopy(current), "status": body.get("status")}
            new["metadata"] = current["metadata"]
        elif "status" in rt.subresources:
            new["status"] = copy.deepcopy(current.get("status"))
            if new["status"] is None:
                new.pop("status")
        stored = self._replace(rt, current, new, path=request.path)
        return web.json_response(self._at_version(stored, rt, version))

    async def _maybe_inject(self, request: web.Request) -> None:
        for index, (method, pattern, times, query) in enumerate(self._hangs):
            if (
                method in ("*", request.method)
                and pattern.search(request.path)
                and query.search(request.query_string)
            ):
                if times <= 1:
                    del self._hangs[index]
                else:
                    self._hangs[index] = (method, pattern, times - 1, query)
                self.hung += 1
                try:
                    await self._unhang.wait()
                finally:
                    self.hung -= 1
                break
        for index, (method, pattern, status, times, retry_after_s) in enumerate(self._injected):
            if method in ("*", request.method) and pattern.search(request.path):
                if times <= 1:
                    del self._injected[index]
                else:
                    self._injected[index] = (method, pattern, status, times - 1, retry_after_s)
                message = f"injected {status}"
                if status == 409:
                    message = "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again"
                headers = {"Retry-After": f"{retry_after_s:g}"} if retry_after_s is not None else None
                raise ApiError(status, REASONS.get(status, "InternalError"), message, headers=headers)

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
        if rt.plural == "customresourcedefinitions":
            self._install_crd(body, path or "create customresourcedefinitions")
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
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(rt, new)  # the last finalizer went: the deletion completes
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
        if rt is not None and name and (not re.match(DNS_SUBDOMAIN, name) or len(name) > 253):
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

    def _admit_pod(self, namespace: str, pod: Obj, path: str) -> None:
        """Pod Security admission: the level the namespace's `enforce` label names (`admission`)."""
        ns_obj = self.store.get(("", "namespaces"), {}).get(("", namespace)) or {}
        level = (ns_obj.get("metadata", {}).get("labels") or {}).get(admission.ENFORCE_LABEL, "privileged")
        problems = admission.violations(pod, level)
        if problems:
            self.forbidden.append((path, problems))
            name = pod.get("metadata", {}).get("name") or pod.get("metadata", {}).get("generateName", "")
            raise ApiError(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: violates PodSecurity "{level}:latest": ' + ", ".join(problems),
            )

    def _install_crd(self, crd: Obj, path: str) -> None:
        """The CEL cost check kube-apiserver runs on a new CRD (`cel_cost`), then serve its kind."""
        problems = cel_cost.problems(crd)
        if problems:
            self.rejected.append((path, problems))
            name = crd["metadata"]["name"]
            raise ApiError(
                422,
                "Invalid",
                f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: ' + "; ".join(problems),
                details={
                    "name": name,
                    "group": "apiextensions.k8s.io",
                    "kind": "CustomResourceDefinition",
                    "causes": [{"reason": "FieldValueForbidden", "message": p} for p in problems],
                },
            )
        spec = crd["spec"]
        if any(r.group == spec["group"] and r.plural == spec["names"]["plural"] for r in self.resources):
            return
        versions = tuple(v["name"] for v in spec["versions"] if v.get("served", True))
        storage = next(v for v in spec["versions"] if v.get("storage"))
        self.resources.append(
            ResourceType(
                spec["group"],
                versions,
                spec["names"]["plural"],
                spec["names"]["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                subresources=tuple(storage.get("subresources", {})),
                crd_schema=storage["schema"]["openAPIV3Schema"],
            )
        )

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
        match = selector_matcher(labels, fields)
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
            self._compacted_rv = self._history[0][0] - 1
        for queue in self._watchers:
            queue.put_nowait((kind, rt, snapshot))

    async def _watch(
        self, request: web.Request, rt: ResourceType, version: str, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        match = selector_matcher(query.get("labelSelector"), query.get("fieldSelector"))
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


def _encode_continue(resource_version: int, offset: int) -> str:
    """An opaque continue token (kube-apiserver's is base64 JSON too: the version and where to resume)."""
    return base64.urlsafe_b64encode(json.dumps({"rv": resource_version, "start": offset}).encode()).decode()


def _decode_continue(token: str) -> tuple[int, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(data["rv"]), int(data["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiError(400, "BadRequest", f"invalid continue token: {exc}") from exc
