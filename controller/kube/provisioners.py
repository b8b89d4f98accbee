"""GPU capacity held ahead of demand, one class per `spec.provisioner.type`.

Each provisioner answers `status() -> (provisioned_gpus, pending_gpus)` and does `provision(gpus)` (0
releases everything it holds). Capacity is counted in replica-shaped chunks: `ceil(gpus / gpusPerReplica)`
pods shaped like one of the target's pods (`pod_spec()`): every container's requests and limits (a vLLM pod
needs its 4 CPUs and 32 GiB on the same node as its GPU, or Karpenter picks the cheapest one-GPU node where
the real pod does not fit), and the target's nodeSelector, affinity, tolerations,
topologySpreadConstraints, runtimeClassName and schedulerName. The containers run the controller's own
image (`PLACEHOLDER_IMAGE`, pause), never one a policy names, under a securityContext that passes the
`restricted` Pod Security Standard, so they are admitted wherever the workers are.

- `pods`: nothing extra; scaling the target ahead of the peak leaves pods pending, which is what Karpenter
  and cluster-autoscaler react to.
- `capacityBuffer`: one `autoscaling.x-k8s.io` CapacityBuffer (`<policy>-buffer` unless named) with
  `replicas` = chunks and a PodTemplate for the chunk. The version is discovered from the server (v1, then
  v1beta1, then v1alpha1), because clusters run different cluster-autoscaler releases.
- `placeholder`: low-priority pods of a PriorityClass with a negative value and `preemptionPolicy: Never`
  (created if absent): they hold nodes, never push anything out, and the scheduler evicts them the moment a
  real pod needs the GPUs. A named PriorityClass that exists with a value >= 0 or another preemption policy
  refuses the policy (`errors.Refused`, reason `PriorityClassRefused`): placeholders at that priority
  would preempt real workloads.
- `provisioningRequest`: a cluster-autoscaler ProvisioningRequest for the chunks, with a PodTemplate. Its
  spec is immutable, so a new count means a new request. Capacity is booked only for a limited time after
  `Provisioned=True` (`provisioner.provisioningRequest.bookingSeconds`, about 10 minutes in
  cluster-autoscaler); while the capacity is still wanted the controller renews the request
  `RENEW_MARGIN_S` before the booking lapses by creating a fresh one and deleting the old.

Everything a provisioner creates carries an ownerReference to its ScalingPolicy (`owner_references()`), so
Kubernetes' garbage collector removes it with the policy whatever happens to the controller, and the label
`forestall.dev/policy`, by which `release_all()` finds and deletes it when the policy is deleted, switches
provisioner type or moves to dryRun (the finalizer's work, `controller.kube.finalizing`).

What this module does not do: decide how many GPUs to hold (`decide()` does) or read demand.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Any, Protocol

from kubernetes import client

from contract import clock as clock_mod
from controller import errors, policy
from controller.kube import api

if TYPE_CHECKING:
    from controller.kube import cluster as kube_cluster

log = logging.getLogger(__name__)

Obj = dict[str, Any]

POLICY_LABEL = "forestall.dev/policy"
"""Label on every object a provisioner creates: the name of the ScalingPolicy it belongs to."""

PLACEHOLDER_LABEL = "forestall.dev/placeholder"
"""Label on placeholder pods, so they are never mistaken for the target's pods."""

CAPACITY_GROUP = "autoscaling.x-k8s.io"
CAPACITY_BUFFER_VERSIONS = ("v1", "v1beta1", "v1alpha1")
"""Newest first: the first the server serves `capacitybuffers` at is used."""

PROVISIONING_REQUEST_VERSION = "v1"
CHECK_CAPACITY_CLASS = "check-capacity.autoscaling.x-k8s.io"
"""A ProvisioningRequest class that only checks whether capacity exists; it never counts as held."""

CONSUME_ANNOTATION = "autoscaling.x-k8s.io/consume-provisioning-request"
"""Pod annotation naming the ProvisioningRequest whose booked capacity the pod may use."""
RENEW_MARGIN_S = 60.0
"""Renew a ProvisioningRequest this long before its booking lapses: one reconcile interval plus slack."""

PLACEHOLDER_PRIORITY = -10
"""Below the default 0, so every ordinary pod preempts a placeholder."""

PLACEHOLDER_IMAGE = "registry.k8s.io/pause:3.10"
"""The only image capacity-holding pods run: it does nothing, is small, and is the controller's choice,
not a policy author's (the controller creates pods under its own grant)."""

NON_ROOT_UID = 65535
"""The pause image's own non-root user."""

SCHEDULING_FIELDS = (
    "nodeSelector",
    "affinity",
    "tolerations",
    "topologySpreadConstraints",
    "runtimeClassName",
    "schedulerName",
)
"""Pod spec fields that decide where a pod may land: copied from the target so capacity comes up where the
workers fit."""

RESTRICTED_POD_SECURITY: Obj = {
    "runAsNonRoot": True,
    "runAsUser": NON_ROOT_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""Pod-level securityContext meeting the `restricted` Pod Security Standard."""

RESTRICTED_CONTAINER_SECURITY: Obj = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}
"""Container-level securityContext meeting the `restricted` Pod Security Standard."""


class Provisioner(Protocol):
    def status(self) -> tuple[int, int]:
        """(GPUs held ahead of demand now, GPUs requested but not yet on Ready nodes)."""
        ...

    def provision(self, gpus: int) -> None:
        """Hold this many GPUs (0 releases them)."""
        ...


def for_policy(
    scaling_policy: policy.ScalingPolicy,
    *,
    api_client: client.ApiClient,
    caches: kube_cluster.Caches,
    clock: clock_mod.Clock,
) -> Provisioner:
    """The provisioner `spec.provisioner.type` names."""
    kind = scaling_policy.spec.provisioner.type
    base = _Base(scaling_policy, api_client=api_client, caches=caches, clock=clock)
    if kind == "capacityBuffer":
        return CapacityBuffer(base)
    if kind == "placeholder":
        return Placeholder(base)
    if kind == "provisioningRequest":
        return ProvisioningRequest(base)
    return base


class _Base:
    """What every provisioner needs; as a provisioner itself it is `pods`: it holds nothing extra."""

    def __init__(
        self,
        scaling_policy: policy.ScalingPolicy,
        *,
        api_client: client.ApiClient,
        caches: kube_cluster.Caches,
        clock: clock_mod.Clock,
    ) -> None:
        self.policy = scaling_policy
        self.name = scaling_policy.metadata.name
        self.namespace = scaling_policy.metadata.namespace
        self.spec = scaling_policy.spec
        self.api_client = api_client
        self.caches = caches
        self.clock = clock
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def status(self) -> tuple[int, int]:
        return 0, 0

    def provision(self, gpus: int) -> None:
        return None

    def chunks(self, gpus: int) -> int:
        return math.ceil(max(0, gpus) / self.spec.capacity.gpus_per_replica)

    def labels(self) -> dict[str, str]:
        return {POLICY_LABEL: self.name}

    def metadata(self, **meta: Any) -> Obj:
        """Metadata of an object this provisioner creates: namespace, labels, owner."""
        out: Obj = {"namespace": self.namespace, "labels": self.labels(), **meta}
        owners = owner_references(self.policy)
        if owners:
            out["ownerReferences"] = owners
        return out

    def pod_spec(self) -> Obj:
        """One replica-shaped pod spec: the target's containers' resources and scheduling fields, run as
        the controller's pause image under a restricted securityContext (see the module docstring)."""
        ref = self.spec.scale_target_ref
        target = self.caches.workloads(ref.kind).get(self.namespace, ref.name) or {}
        template = target.get("spec", {}).get("template", {}).get("spec", {})
        gpu = self.spec.capacity.gpu_resource_name
        containers = [_holder(c) for c in template.get("containers") or []]
        if not any(gpu in c["resources"].get("requests", {}) for c in containers):
            # no target (yet) or one that does not ask for the GPU: hold the GPUs one replica needs
            want = {gpu: str(self.spec.capacity.gpus_per_replica)}
            containers.append(_holder({"name": "capacity", "resources": {"requests": want, "limits": want}}))
        spec: Obj = {
            "containers": containers,
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "securityContext": dict(RESTRICTED_POD_SECURITY),
        }
        init = [_holder(c) for c in template.get("initContainers") or [] if (c.get("resources") or {})]
        if init:
            spec["initContainers"] = init
        for key in SCHEDULING_FIELDS:
            if template.get(key):
                spec[key] = template[key]
        return spec

    def ensure_pod_template(self, name: str) -> None:
        """Create or update the PodTemplate of one chunk (no call when it is already as wanted)."""
        body: Obj = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": self.metadata(name=name),
            "template": {"metadata": {"labels": self.labels()}, "spec": self.pod_spec()},
        }
        key = (self.api_client.configuration.host, self.namespace, name)
        if _ENSURED.get(key) == body:
            return
        try:
            current = api.call(self.core.read_namespaced_pod_template, name, self.namespace)
        except errors.NotFound:
            api.call(self.core.create_namespaced_pod_template, self.namespace, body)
        else:
            if current.get("template") != body["template"]:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                api.call(self.core.replace_namespaced_pod_template, name, self.namespace, body)
                del body["metadata"]["resourceVersion"]
        _ENSURED[key] = body


def _holder(container: Obj) -> Obj:
    """A pause container with the resources of `container` (requests defaulted from limits, as the API
    server does) and a restricted securityContext."""
    resources = container.get("resources") or {}
    limits = dict(resources.get("limits") or {})
    requests = {**limits, **(resources.get("requests") or {})}
    out: Obj = {
        "name": container["name"],
        "image": PLACEHOLDER_IMAGE,
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
    }
    if container.get("restartPolicy"):
        out["restartPolicy"] = container["restartPolicy"]  # a native sidecar counts beside the containers
    return out


def owner_references(scaling_policy: policy.ScalingPolicy) -> list[Obj]:
    """The ownerReference to a ScalingPolicy (none before the API server gave it a uid).

    `blockOwnerDeletion` is left unset: setting it needs the `update` verb on the policy's finalizers
    subresource, and the finalizer already orders the cleanup.
    """
    uid = scaling_policy.metadata.uid
    if not uid:
        return []
    return [
        {
            "apiVersion": policy.API_VERSION,
            "kind": policy.KIND,
            "name": scaling_policy.metadata.name,
            "uid": uid,
            "controller": True,
        }
    ]


def release_all(
    api_client: client.ApiClient,
    caches: kube_cluster.Caches,
    *,
    namespace: str,
    name: str,
    keep: str | None = None,
) -> list[str]:
    """Delete everything the provisioners made for policy `name` (labelled `forestall.dev/policy`), except
    the objects of provisioner type `keep`; returns one line per deleted object.

    Kinds the server does not serve (no CapacityBuffer CRD, no ProvisioningRequest CRD) are skipped.
    """
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    selector = f"{POLICY_LABEL}={name}"
    done: list[str] = []
    if keep != "placeholder":
        for pod in caches.pods.by_label(namespace, {POLICY_LABEL: name, PLACEHOLDER_LABEL: "true"}):
            _delete(core.delete_namespaced_pod, pod["metadata"]["name"], namespace)
            caches.pods.apply(pod, deleted=True)
            done.append(f"pod {pod['metadata']['name']}")
    kinds = [("capacityBuffer", "capacitybuffers"), ("provisioningRequest", "provisioningrequests")]
    kept_templates: set[str] = set()
    for kind, plural in kinds:
        version = _served_version(api_client, plural)
        if version is None:
            continue
        try:
            listed = api.call(
                custom.list_namespaced_custom_object,
                CAPACITY_GROUP,
                version,
                namespace,
                plural,
                label_selector=selector,
            )
        except errors.Forbidden:
            continue  # not granted (no cluster-autoscaler overlay): the controller never made any
        for item in listed.get("items", []):
            item_name = item["metadata"]["name"]
            if kind == keep:
                spec = item.get("spec", {})
                refs = [spec.get("podTemplateRef")] + [
                    ps.get("podTemplateRef") for ps in spec.get("podSets", [])
                ]
                kept_templates.update(r["name"] for r in refs if r and r.get("name"))
                continue
            _delete(
                custom.delete_namespaced_custom_object, CAPACITY_GROUP, version, namespace, plural, item_name
            )
            done.append(f"{plural} {item_name}")
    try:
        templates = api.call(core.list_namespaced_pod_template, namespace, label_selector=selector)
    except errors.Forbidden:
        templates = {}  # not granted (no cluster-autoscaler overlay): the controller never made any
    for item in templates.get("items", []):
        item_name = item["metadata"]["name"]
        if item_name in kept_templates:
            continue
        _delete(core.delete_namespaced_pod_template, item_name, namespace)
        _ENSURED.pop((api_client.configuration.host, namespace, item_name), None)
        done.append(f"podtemplate {item_name}")
    return done


def _served_version(api_client: client.ApiClient, plural: str) -> str | None:
    versions = CAPACITY_BUFFER_VERSIONS if plural == "capacitybuffers" else (PROVISIONING_REQUEST_VERSION,)
    custom = client.CustomObjectsApi(api_client)
    for version in versions:
        try:
            found = api.call(custom.get_api_resources, CAPACITY_GROUP, version)
        except errors.NotFound:
            continue
        if any(r.get("name") == plural for r in found.get("resources", [])):
            return version
    return None


def _delete(fn: Any, *args: Any) -> None:
    try:
        api.call(fn, *args)
    except errors.NotFound:
        pass  # already gone


_ENSURED: dict[tuple[str, str, str], Obj] = {}
"""PodTemplates written by this process, as written: saves a read per reconcile when nothing changed."""

_VERSIONS: dict[str, str] = {}
_versions_lock = threading.Lock()


class CapacityBuffer:
    """`provisioner.type: capacityBuffer`: a CapacityBuffer whose replicas are the chunks held."""

    def __init__(self, base: _Base) -> None:
        self.base = base
        configured = base.spec.provisioner.capacity_buffer
        self.buffer_name = (
            configured.name if configured and configured.name else None
        ) or f"{base.name}-buffer"

    def version(self) -> str:
        """The CapacityBuffer version the server serves (discovered once per process and API server)."""
        host = self.base.api_client.configuration.host
        with _versions_lock:
            if host in _VERSIONS:
                return _VERSIONS[host]
        for version in CAPACITY_BUFFER_VERSIONS:
            try:
                found = api.call(self.base.custom.get_api_resources, CAPACITY_GROUP, version)
            except errors.NotFound:
                continue
            if any(r.get("name") == "capacitybuffers" for r in found.get("resources", [])):
                with _versions_lock:
                    _VERSIONS[host] = version
                return version
        raise errors.ClusterError(
            f"the API server serves no {CAPACITY_GROUP} CapacityBuffer (tried {', '.join(CAPACITY_BUFFER_VERSIONS)}): "
            "install cluster-autoscaler's CapacityBuffer CRD or choose another spec.provisioner.type"
        )

    def _read(self) -> Obj | None:
        try:
            return api.call(
                self.base.custom.get_namespaced_custom_object,
                CAPACITY_GROUP,
                self.version(),
                self.base.namespace,
                "capacitybuffers",
                self.buffer_name,
            )
        except errors.NotFound:
            return None

    def status(self) -> tuple[int, int]:
        buffer = self._read()
        if buffer is None:
            return 0, 0
        chunks = int(buffer.get("status", {}).get("replicas", buffer.get("spec", {}).get("replicas", 0)) or 0)
        return chunks * self.base.spec.capacity.gpus_per_replica, 0

    def provision(self, gpus: int) -> None:
        chunks = self.base.chunks(gpus)
        self.base.ensure_pod_template(self.buffer_name)
        version = self.version()
        current = self._read()
        if current is None:
            body = {
                "apiVersion": f"{CAPACITY_GROUP}/{version}",
                "kind": "CapacityBuffer",
                "metadata": self.base.metadata(name=self.buffer_name),
                "spec": {"podTemplateRef": {"name": self.buffer_name}, "replicas": chunks},
            }
            api.call(
                self.base.custom.create_namespaced_custom_object,
                CAPACITY_GROUP,
                version,
                self.base.namespace,
                "capacitybuffers",
                body,
            )
        elif current.get("spec", {}).get("replicas") != chunks:
            api.call(
                self.base.custom.patch_namespaced_custom_object,
                CAPACITY_GROUP,
                version,
                self.base.namespace,
                "capacitybuffers",
                self.buffer_name,
                {"spec": {"replicas": chunks}},
            )


class Placeholder:
    """`provisioner.type: placeholder`: low-priority pause pods requesting the GPUs."""

    def __init__(self, base: _Base) -> None:
        self.base = base
        settings = base.spec.provisioner.placeholder or policy.PlaceholderProvisioner()
        self.settings = settings

    def pods(self) -> list[Obj]:
        labels = {**self.base.labels(), PLACEHOLDER_LABEL: "true"}
        return sorted(
            (
                p
                for p in self.base.caches.pods.by_label(self.base.namespace, labels)
                if not p["metadata"].get("deletionTimestamp")
            ),
            key=lambda p: str(p["metadata"]["name"]),
        )

    def status(self) -> tuple[int, int]:
        pods = self.pods()
        per = self.base.spec.capacity.gpus_per_replica
        pending = sum(1 for p in pods if not p.get("spec", {}).get("nodeName"))
        return len(pods) * per, pending * per

    def ensure_priority_class(self) -> None:
        """Create the PriorityClass if absent; refuse one that exists and could preempt real pods.

        Raises:
            errors.Refused: the class has a value >= 0 or a preemptionPolicy other than Never.
        """
        scheduling = client.SchedulingV1Api(self.base.api_client)
        name = self.settings.priority_class_name
        key = (self.base.api_client.configuration.host, name)
        if key in _PRIORITY_CLASSES:
            return
        try:
            found = api.call(scheduling.read_priority_class, name)
        except errors.NotFound:
            body = {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "forestall"}},
                "value": PLACEHOLDER_PRIORITY,
                "preemptionPolicy": "Never",
                "globalDefault": False,
                "description": "Forestall placeholder pods: hold GPU nodes ahead of demand, evicted by any real pod.",
            }
            try:
                api.call(scheduling.create_priority_class, body)
            except errors.Conflict:
                pass  # another replica created it first
        else:
            value, preemption = found.get("value", 0), found.get("preemptionPolicy", "PreemptLowerPriority")
            if value >= 0 or preemption != "Never":
                raise errors.Refused(
                    "PriorityClassRefused",
                    f"provisioner.placeholder.priorityClassName {name!r} has value {value} and preemptionPolicy "
                    f"{preemption}: placeholders must have a negative value and preemptionPolicy Never, or they "
                    "would preempt real pods; name another class or remove the field to use forestall-placeholder",
                )
        _PRIORITY_CLASSES.add(key)

    def provision(self, gpus: int) -> None:
        want = self.base.chunks(gpus)
        pods = self.pods()
        if want > len(pods):
            self.ensure_priority_class()
        for _ in range(want - len(pods)):
            labels = {**self.base.caches.pod_labels, **self.base.labels(), PLACEHOLDER_LABEL: "true"}
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    **self.base.metadata(generateName=f"{self.base.name}-placeholder-"),
                    "labels": labels,
                },
                "spec": {
                    **self.base.pod_spec(),
                    "priorityClassName": self.settings.priority_class_name,
                },
            }
            created = api.call(self.base.core.create_namespaced_pod, self.base.namespace, body)
            self.base.caches.pods.apply(created)
        # Remove pending placeholders first: they hold nothing yet.
        extra = sorted(pods, key=lambda p: bool(p.get("spec", {}).get("nodeName")))[
            : max(0, len(pods) - want)
        ]
        for pod in extra:
            name = pod["metadata"]["name"]
            try:
                api.call(self.base.core.delete_namespaced_pod, name, self.base.namespace)
            except errors.NotFound:
                pass
            self.base.caches.pods.apply(pod, deleted=True)


_PRIORITY_CLASSES: set[tuple[str, str]] = set()
"""PriorityClasses known to exist, per API server: checked once per process."""


class ProvisioningRequest:
    """`provisioner.type: provisioningRequest`: one request for the chunks, renewed before its booking lapses."""

    def __init__(self, base: _Base) -> None:
        self.base = base
        self.settings = base.spec.provisioner.provisioning_request or policy.ProvisioningRequestProvisioner()
        self.template_name = f"{base.name}-provreq"

    def requests(self) -> list[Obj]:
        body = api.call(
            self.base.custom.list_namespaced_custom_object,
            CAPACITY_GROUP,
            PROVISIONING_REQUEST_VERSION,
            self.base.namespace,
            "provisioningrequests",
            label_selector=f"{POLICY_LABEL}={self.base.name}",
        )
        items: list[Obj] = body.get("items", [])
        # oldest first by creation time (name breaks ties within a second); a resourceVersion is opaque
        return sorted(
            items, key=lambda o: (o["metadata"].get("creationTimestamp") or "", o["metadata"]["name"])
        )

    def _count(self, request: Obj) -> int:
        return sum(int(ps.get("count", 0)) for ps in request.get("spec", {}).get("podSets", []))

    def _provisioned_since(self, request: Obj) -> float | None:
        for cond in request.get("status", {}).get("conditions") or []:
            if cond.get("type") == "Provisioned" and cond.get("status") == "True":
                return api.parse_time(cond.get("lastTransitionTime"))
        return None

    def _failed(self, request: Obj) -> bool:
        return any(
            c.get("type") in ("Failed", "BookingExpired", "CapacityRevoked") and c.get("status") == "True"
            for c in request.get("status", {}).get("conditions") or []
        )

    def status(self) -> tuple[int, int]:
        if self.settings.provisioning_class_name == CHECK_CAPACITY_CLASS:
            return 0, 0  # check-capacity only answers whether capacity exists: it adds and holds nothing
        per = self.base.spec.capacity.gpus_per_replica
        provisioned = pending = 0
        now = self.base.clock.now()
        for request in self.requests():
            since = self._provisioned_since(request)
            if self._failed(request):
                continue
            if since is None:
                pending += self._count(request) * per
            elif now - since < self.settings.booking_s - RENEW_MARGIN_S:
                # a booking about to lapse is not counted as held, so the plan's GPUs differ from the
                # state's and the loop calls provision(), which renews it
                provisioned += self._count(request) * per
        return provisioned, pending

    def provision(self, gpus: int) -> None:
        want = self.base.chunks(gpus)
        requests = self.requests()
        live = [r for r in requests if not self._failed(r)]
        current = live[-1] if live else None
        now = self.base.clock.now()
        keep = current is not None and self._count(current) == want and want > 0
        if keep and current is not None:
            since = self._provisioned_since(current)
            if since is not None and now - since >= self.settings.booking_s - RENEW_MARGIN_S:
                log.info(
                    "%s/%s: ProvisioningRequest %s booked since %.0f s: renewing",
                    self.base.namespace,
                    self.base.name,
                    current["metadata"]["name"],
                    now - since,
                )
                keep = False
        if not keep:
            # delete before create: a renewal must not book the capacity twice, even for a moment
            for request in requests:
                self._delete(request["metadata"]["name"])
            requests = []
        if want > 0 and not keep:
            self.base.ensure_pod_template(self.template_name)
            body = {
                "apiVersion": f"{CAPACITY_GROUP}/{PROVISIONING_REQUEST_VERSION}",
                "kind": "ProvisioningRequest",
                "metadata": self.base.metadata(generateName=f"{self.base.name}-"),
                "spec": {
                    "provisioningClassName": self.settings.provisioning_class_name,
                    "podSets": [{"podTemplateRef": {"name": self.template_name}, "count": want}],
                },
            }
            created = api.call(
                self.base.custom.create_namespaced_custom_object,
                CAPACITY_GROUP,
                PROVISIONING_REQUEST_VERSION,
                self.base.namespace,
                "provisioningrequests",
                body,
            )
            keep_name = created["metadata"]["name"]
        else:
            keep_name = current["metadata"]["name"] if current is not None and want > 0 else ""
        for request in requests:
            if request["metadata"]["name"] != keep_name:
                self._delete(request["metadata"]["name"])
        if keep_name:
            self._bind_pending_pods(keep_name)

    def _delete(self, name: str) -> None:
        _delete(
            self.base.custom.delete_namespaced_custom_object,
            CAPACITY_GROUP,
            PROVISIONING_REQUEST_VERSION,
            self.base.namespace,
            "provisioningrequests",
            name,
        )

    def _bind_pending_pods(self, request_name: str) -> None:
        """Mark the target's unscheduled pods to consume the request's booked capacity: cluster-autoscaler
        only lets pods carrying `CONSUME_ANNOTATION` (naming the request) onto the nodes it booked."""
        ref = self.base.spec.scale_target_ref
        target = self.base.caches.workloads(ref.kind).get(self.base.namespace, ref.name)
        if target is None:
            return
        labels = target.get("spec", {}).get("selector", {}).get("matchLabels") or {}
        core = client.CoreV1Api(self.base.api_client)
        for pod in self.base.caches.pods.by_label(self.base.namespace, labels):
            meta = pod["metadata"]
            if pod.get("spec", {}).get("nodeName") or meta.get("deletionTimestamp"):
                continue
            if PLACEHOLDER_LABEL in (meta.get("labels") or {}):
                continue
            if (meta.get("annotations") or {}).get(CONSUME_ANNOTATION) == request_name:
                continue
            try:
                written = api.call(
                    core.patch_namespaced_pod,
                    meta["name"],
                    self.base.namespace,
                    {"metadata": {"annotations": {CONSUME_ANNOTATION: request_name}}},
                    _content_type="application/merge-patch+json",
                )
            except errors.NotFound:
                continue
            self.base.caches.pods.apply(written)
