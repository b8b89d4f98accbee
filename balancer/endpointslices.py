"""Kubernetes discovery: watch a Service's EndpointSlices (and its pods) with plain aiohttp REST calls.

The balancer must not import the `kubernetes` client (import-linter forbids it: the balancer is a data-plane
process that should stay small and async), so this module speaks the REST API directly: list, then watch from
the list's resourceVersion, relist on 410 Gone or a broken watch.

    GET /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices?labelSelector=kubernetes.io/service-name=NAME
    GET /api/v1/namespaces/NS/pods                        (start time, drain annotation, weight annotation)

How an endpoint maps to a backend:
- `ready` (or unset) and not `terminating`: a backend; warming while its pod started less than the slow-start
  ramp ago (the pod's `status.startTime` dates the ramp, so restarting the balancer does not re-warm old pods);
- `terminating` (serving or not): kept and drained: no new streams or sessions, the open ones finish;
- not ready and not terminating (starting, failing its probe): not a backend;
- pod annotation `forestall.dev/drain` (any value; the controller writes its drain start time): drained;
- pod annotation `forestall.dev/capacity-weight`: its capacity weight (default 1). With a mixed GPU pool
  (`capacity.gpuTypes`) the controller writes it from the GPU type of the pod's node (label
  `nvidia.com/gpu.product`): the type's streams per replica over the policy's `streamsPerReplica`. The
  balancer reads only pods, not nodes, so it needs no node permissions.

Credentials: in-cluster service account (token and CA under /var/run/secrets/kubernetes.io/serviceaccount,
host from KUBERNETES_SERVICE_HOST/PORT) unless kube_api_url / kube_token_file / kube_ca_file are given. The
token file is read again for every list and watch: projected service-account tokens rotate (the kubelet
rewrites the file well before the hour is up), and a token read once at startup expires under a long-running
watch. A list or watch happens every few minutes at most, so reading a small file each time costs nothing.

What this module does not do: write anything to the API (the controller annotates; we only read).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp

from balancer.config import BackendSpec
from balancer.errors import BalancerError
from balancer.runtime import Balancer
from contract import pod_annotations

log = logging.getLogger(__name__)

DRAIN_ANNOTATION: Final = pod_annotations.DRAIN
WEIGHT_ANNOTATION: Final = pod_annotations.CAPACITY_WEIGHT
SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RELIST_BACKOFF_S: Final = (0.5, 30.0)
"""After a failed list or watch, wait 0.5 s, doubling to 30 s: quick recovery without hammering the API."""
WATCH_TIMEOUT_S: Final = 290
"""Server-side watch timeout; below the API server's 5-minute default cap so we reconnect on our own terms."""


class KubeError(BalancerError):
    """The API server answered an error (status in the message)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class EndpointSliceWatch:
    """Keeps the pool's `kube:NS/NAME` source equal to the Service's endpoints."""

    def __init__(self, bal: Balancer, service: str) -> None:
        self.bal = bal
        self.namespace, _, self.name = service.partition("/")
        self.source = f"kube:{service}"
        self.slices: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.synced = False
        self.token_file: Path | None = None

    async def run(self) -> None:
        """List pods, then slices (so the first sync knows pod start times), then watch both until cancelled."""
        config = self.bal.config
        base, self.token_file, ssl_ctx = _credentials(
            config.kube_api_url, config.kube_token_file, config.kube_ca_file
        )
        connector = aiohttp.TCPConnector(ssl=ssl_ctx)
        headers = {"Accept": "application/json"}
        async with aiohttp.ClientSession(base_url=base, headers=headers, connector=connector) as session:
            versions = {}
            for kind in ("pods", "slices"):
                path, params = self._query(kind)
                versions[kind] = await self._list(session, kind, path, params)
            async with asyncio.TaskGroup() as group:
                for kind in ("pods", "slices"):
                    group.create_task(self._loop(session, kind, versions[kind]))

    async def _loop(self, session: aiohttp.ClientSession, kind: str, version: str | None) -> None:
        backoff_s = RELIST_BACKOFF_S[0]
        path, params = self._query(kind)
        while True:
            try:
                if version is None:
                    version = await self._list(session, kind, path, params)
                    backoff_s = RELIST_BACKOFF_S[0]
                query = {**params, "resourceVersion": version}
                async for event in _watch(session, path, query, headers=self._auth()):
                    version = _event_version(event) or version
                    self._apply(kind, event)
            except (aiohttp.ClientError, KubeError, TimeoutError, ValueError) as exc:
                log.warning(
                    "watch of %s for %s/%s failed (%s); relisting in %.1fs",
                    kind,
                    self.namespace,
                    self.name,
                    exc,
                    backoff_s,
                )
                await self.bal.clock.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RELIST_BACKOFF_S[1])
                version = None

    def _auth(self) -> dict[str, str]:
        """The Authorization header from the token file as it is now (it rotates)."""
        if self.token_file is None:
            return {}
        try:
            return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        except OSError as exc:
            raise KubeError(
                f"cannot read the token file {self.token_file}: {exc.strerror}", status=401
            ) from exc

    def _query(self, kind: str) -> tuple[str, dict[str, str]]:
        if kind == "slices":
            path = f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
            return path, {"labelSelector": f"kubernetes.io/service-name={self.name}"}
        return f"/api/v1/namespaces/{self.namespace}/pods", {}

    async def _list(
        self, session: aiohttp.ClientSession, kind: str, path: str, params: dict[str, str]
    ) -> str:
        async with session.get(path, params=params, headers=self._auth()) as resp:
            if resp.status != 200:
                raise KubeError(
                    f"list {path}: HTTP {resp.status}: {(await resp.text())[:200]}", status=resp.status
                )
            doc = await resp.json()
        items = {item["metadata"]["name"]: item for item in doc.get("items", [])}
        if kind == "slices":
            self.slices = items
        else:
            self.pods = items
        self.resync()
        return str(doc.get("metadata", {}).get("resourceVersion", ""))

    def _apply(self, kind: str, event: dict[str, Any]) -> None:
        kind_type = event.get("type")
        obj = event.get("object") or {}
        if kind_type == "ERROR":
            raise KubeError(f"watch error: {obj.get('message', obj)}", status=int(obj.get("code", 500)))
        if kind_type not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK
        table = self.slices if kind == "slices" else self.pods
        name = obj["metadata"]["name"]
        if kind_type == "DELETED":
            table.pop(name, None)
        else:
            table[name] = obj
        self.resync()

    def resync(self) -> None:
        """Recompute this Service's backends from the slices and pods seen so far and sync the pool."""
        specs: dict[str, BackendSpec] = {}
        started: dict[str, float] = {}
        clock = self.bal.clock
        port_name = self.bal.config.kube_port_name
        for item in self.slices.values():
            port = _pick_port(item.get("ports") or [], port_name)
            if port is None:
                continue
            for endpoint in item.get("endpoints") or []:
                conditions = endpoint.get("conditions") or {}
                terminating = bool(conditions.get("terminating"))
                ready = conditions.get("ready") is not False
                if not ready and not terminating:
                    continue
                pod_name = (endpoint.get("targetRef") or {}).get("name")
                pod = self.pods.get(pod_name or "", {})
                annotations = (pod.get("metadata") or {}).get("annotations") or {}
                for ip in endpoint.get("addresses") or []:
                    address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                    specs[address] = BackendSpec(
                        address=address,
                        pod=pod_name,
                        weight=_weight(annotations.get(WEIGHT_ANNOTATION)),
                        drain=terminating or DRAIN_ANNOTATION in annotations,
                    )
                    start = (pod.get("status") or {}).get("startTime")
                    if start:
                        age_s = clock.now() - _parse_time(start)
                        started[address] = clock.monotonic() - max(age_s, 0.0)
        self.bal.pool.sync(
            specs.values(), source=self.source, initial=not self.synced and not started, started_s=started
        )
        self.synced = True


async def _watch(
    session: aiohttp.ClientSession, path: str, params: dict[str, str], *, headers: dict[str, str]
) -> AsyncIterator[dict[str, Any]]:
    query = {**params, "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_TIMEOUT_S)}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 30)
    async with session.get(path, params=query, headers=headers, timeout=timeout) as resp:
        if resp.status != 200:
            raise KubeError(f"watch {path}: HTTP {resp.status}", status=resp.status)
        async for line in resp.content:
            if line.strip():
                yield json.loads(line)


def _event_version(event: dict[str, Any]) -> str | None:
    """The resourceVersion to resume from after this event (BOOKMARKs carry one too)."""
    metadata = (event.get("object") or {}).get("metadata") or {}
    value = metadata.get("resourceVersion")
    return str(value) if value else None


def _pick_port(ports: list[dict[str, Any]], name: str | None) -> int | None:
    for port in ports:
        if name is None or port.get("name") == name:
            value = port.get("port")
            return int(value) if value is not None else None
    return None


def _weight(raw: str | None) -> float:
    if raw is None:
        return 1.0
    with contextlib.suppress(ValueError):
        value = float(raw)
        if value > 0:
            return value
    log.warning("ignoring %s=%r: not a number > 0", WEIGHT_ANNOTATION, raw)
    return 1.0


def _parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _credentials(
    url: str | None, token_file: Path | None, ca_file: Path | None
) -> tuple[str, Path | None, ssl.SSLContext | bool]:
    if url is None:
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host:
            raise BalancerError(
                "not in a cluster (no KUBERNETES_SERVICE_HOST): give kube_api_url (--kube-api-url)"
            )
        url = f"https://{host}:{port}"
        token_file = token_file or SERVICE_ACCOUNT / "token"
        ca_file = ca_file or SERVICE_ACCOUNT / "ca.crt"
    ssl_ctx: ssl.SSLContext | bool = True
    if ca_file is not None and url.startswith("https"):
        ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
    return url, token_file, ssl_ctx
