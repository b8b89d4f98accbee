"""`KubeCluster`: the `controller.cluster.Cluster` of one ScalingPolicy's scale target on a real API server.

Reads come from shared list+watch caches (`Caches`: pods, nodes, Deployments, StatefulSets), so `state()`
costs no API call; writes go to the API server and are put into the caches at once.

- `set_replicas` reads the target's `scale` subresource and replaces it with the read `resourceVersion`
  (optimistic concurrency): a 409 means someone else scaled in between, so it re-reads and tries again
  (`SCALE_CONFLICT_ATTEMPTS`), then raises `errors.Conflict` for the loop to requeue.
- `annotate` merge-patches only the annotations that differ from the cached pod, so re-applying a plan
  makes no calls. `controller.kubernetes.io/pod-deletion-cost` is set once per pod: if the value later
  differs from what this controller wrote, something else (Karpenter, another controller, a human) has
  overwritten it; that is logged, reported by `deletion_cost_overwrites()` and not fought over.
- `provision` hands the GPUs to the policy's provisioner (`controller.kube.provisioners`).
- Lead times are measured from the pods' and nodes' own timestamps (created -> PodScheduled -> container
  running -> Ready; node created -> Ready) and reported as medians of the last `LEAD_TIME_SAMPLES`.

What it does not do: decide anything, or know about other policies' targets.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from kubernetes import client

from contract import clock as clock_mod
from controller import cluster, errors, policy
from controller.kube import api, finalizing, informer, provisioners

log = logging.getLogger(__name__)

Obj = dict[str, Any]

SCALE_CONFLICT_ATTEMPTS = 3
"""Read-modify-write attempts on the scale subresource before giving the conflict to the loop."""

LEAD_TIME_SAMPLES = 50
"""Recent observations behind each measured lead time: enough for a stable median, recent enough to follow
a change of node type or image."""

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""The label that ties an EndpointSlice to its Service."""

MAX_NODE_PROVISIONING_S = 3600.0
"""A node whose Ready came more than an hour after its creation was restarted, not provisioned: ignored."""


def selector_labels(selector: str | None) -> dict[str, str]:
    """The labels of an equality-only label selector (`a=b,c=d`).

    Raises:
        ValueError: a term that is not `key=value` (set-based terms cannot be copied onto placeholder pods).
    """
    labels: dict[str, str] = {}
    for term in (selector or "").split(","):
        term = term.strip()
        if not term:
            continue
        key, sep, value = term.partition("=")
        if not sep or value.startswith("=") or "!" in key or not key.strip():
            raise ValueError(f"--pod-selector must be key=value terms joined by commas, got {term!r}")
        labels[key.strip()] = value.strip()
    return labels


class Caches:
    """The informers a controller process shares between all its policies (one namespace or all)."""

    def __init__(
        self, api_client: client.ApiClient, *, namespace: str | None = None, pod_selector: str | None = None
    ) -> None:
        """`pod_selector` (`key=value[,key=value]`) limits the pod cache to the pods carrying those labels:
        in a cluster of many pods, only the model pods (label them in the workloads' pod templates) are held
        in memory. Placeholder pods get the same labels so they stay visible."""
        core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
        self.pod_labels = selector_labels(pod_selector)

        def scoped(namespaced: Any, everywhere: Any) -> tuple[Any, tuple[str, ...]]:
            return (namespaced, (namespace,)) if namespace else (everywhere, ())

        pods_fn, pods_args = scoped(core.list_namespaced_pod, core.list_pod_for_all_namespaces)
        dep_fn, dep_args = scoped(apps.list_namespaced_deployment, apps.list_deployment_for_all_namespaces)
        sts_fn, sts_args = scoped(
            apps.list_namespaced_stateful_set, apps.list_stateful_set_for_all_namespaces
        )
        self.pods = informer.Informer(pods_fn, *pods_args, name="pods", label_selector=pod_selector or None)
        self.deployments = informer.Informer(dep_fn, *dep_args, name="deployments")
        self.statefulsets = informer.Informer(sts_fn, *sts_args, name="statefulsets")
        self.nodes = informer.Informer(core.list_node, name="nodes")
        discovery = client.DiscoveryV1Api(api_client)
        eps_fn, eps_args = scoped(
            discovery.list_namespaced_endpoint_slice, discovery.list_endpoint_slice_for_all_namespaces
        )
        self.endpointslices = informer.Informer(eps_fn, *eps_args, name="endpointslices")
        autoscaling = client.AutoscalingV2Api(api_client)
        hpa_fn, hpa_args = scoped(
            autoscaling.list_namespaced_horizontal_pod_autoscaler,
            autoscaling.list_horizontal_pod_autoscaler_for_all_namespaces,
        )
        self.hpas = informer.Informer(hpa_fn, *hpa_args, name="horizontalpodautoscalers")
        """HPAs (KEDA's ScaledObjects create one too): a target they scale is left to them."""
        self.all = (
            self.pods,
            self.deployments,
            self.statefulsets,
            self.nodes,
            self.endpointslices,
            self.hpas,
        )
        self._node_memo: dict[str, tuple[str, tuple[cluster.NodeState, ...]]] = {}
        self._node_lock = threading.Lock()

    def start(self) -> None:
        for inf in self.all:
            inf.start()

    def stop(self) -> None:
        for inf in self.all:
            inf.stop()

    def wait_synced(self, timeout_s: float) -> bool:
        return all(inf.wait_synced(timeout_s) for inf in self.all)

    def service_addresses(self, namespace: str, service: str) -> list[str]:
        """Addresses of a Service's ready endpoints, from its EndpointSlices (no API call: the cache).

        This is the `balancer_endpoints` lookup of `controller.demand.Demands`: it finds the balancer
        replicas to ask for `/signals`. Every endpoint whose `serving` is not false counts, terminating or
        not: a terminating balancer replica still relays its streams for up to its grace period, and the
        pods reached only through it would look empty (and be removed mid-stream) if it were not asked.
        Without `serving` (older API servers), `ready` decides.
        """
        slices = self.endpointslices.by_label(namespace, {SERVICE_NAME_LABEL: service})
        addresses: set[str] = set()
        for eps in slices:
            for endpoint in eps.get("endpoints") or []:
                conditions = endpoint.get("conditions") or {}
                serving = conditions.get("serving")
                if serving is False or (serving is None and conditions.get("ready") is False):
                    continue
                addresses.update(endpoint.get("addresses") or [])
        return sorted(addresses)

    def other_scaler(self, namespace: str, kind: str, name: str) -> str | None:
        """Who else scales this workload: "HorizontalPodAutoscaler <name>" or "KEDA ScaledObject <name>"
        (KEDA scales through an HPA it owns), or None."""
        for hpa in self.hpas.items(namespace):
            ref = hpa.get("spec", {}).get("scaleTargetRef") or {}
            if ref.get("kind") != kind or ref.get("name") != name:
                continue
            for owner in hpa["metadata"].get("ownerReferences") or []:
                if owner.get("kind") == "ScaledObject":
                    return f"KEDA ScaledObject {owner.get('name')}"
            return f"HorizontalPodAutoscaler {hpa['metadata']['name']}"
        return None

    def workloads(self, kind: str) -> informer.Informer:
        return self.deployments if kind == "Deployment" else self.statefulsets

    def gpu_nodes(self, resource_name: str) -> tuple[cluster.NodeState, ...]:
        """Nodes offering `resource_name`, computed once per change of the node cache (shared by policies)."""
        version = self.nodes.resource_version
        with self._node_lock:
            memo = self._node_memo.get(resource_name)
            if memo is not None and memo[0] == version:
                return memo[1]
        nodes = tuple(
            state for obj in self.nodes.items() if (state := _node_state(obj, resource_name)) is not None
        )
        with self._node_lock:
            self._node_memo[resource_name] = (version, nodes)
        return nodes


class KubeCluster:
    """One policy's scale target, its pods, the GPU nodes and the provisioner, on a Kubernetes API server."""

    def __init__(
        self,
        scaling_policy: policy.ScalingPolicy,
        *,
        api_client: client.ApiClient,
        caches: Caches,
        clock: clock_mod.Clock = clock_mod.SYSTEM,
    ) -> None:
        self.api_client = api_client
        self.caches = caches
        self.clock = clock
        self._costs_set: dict[str, str] = {}
        self._overwritten: dict[str, str] = {}
        self._pod_samples: dict[str, tuple[float | None, float | None]] = {}
        self._pod_order: deque[str] = deque(maxlen=LEAD_TIME_SAMPLES)
        self._node_samples: dict[str, float] = {}
        self._node_order: deque[str] = deque(maxlen=LEAD_TIME_SAMPLES)
        self._pod_states: dict[tuple[str, str], cluster.PodState] = {}
        self._release_others = False
        self.update_policy(scaling_policy)

    def update_policy(self, scaling_policy: policy.ScalingPolicy) -> None:
        """Follow a changed policy without losing measured lead times or the deletion costs written.

        A switch of provisioner type releases what the old type holds, at the next `state()` (on a worker
        thread: this method runs on the event loop and does no I/O).
        """
        old = getattr(self, "spec", None)
        if old is not None and old.provisioner.type != scaling_policy.spec.provisioner.type:
            self._release_others = True
        self.policy = scaling_policy
        self.namespace = scaling_policy.metadata.namespace
        self.spec = scaling_policy.spec
        self.provisioner = provisioners.for_policy(
            scaling_policy, api_client=self.api_client, caches=self.caches, clock=self.clock
        )

    # --- reads ---------------------------------------------------------------------------------------------

    def target(self) -> Obj:
        """The cached scale target; `errors.NotFound` when it does not exist."""
        ref = self.spec.scale_target_ref
        obj = self.caches.workloads(ref.kind).get(self.namespace, ref.name)
        if obj is None:
            raise errors.NotFound(
                f"scale target {ref.kind} {self.namespace}/{ref.name} not found: "
                "create it or fix spec.scaleTargetRef"
            )
        return obj

    def state(self) -> cluster.ClusterState:
        if self._release_others:
            done = provisioners.release_all(
                self.api_client,
                self.caches,
                namespace=self.namespace,
                name=self.policy.metadata.name,
                keep=self.spec.provisioner.type,
            )
            self._release_others = False
            if done:
                log.info(
                    "%s/%s: provisioner switched; released %s",
                    self.namespace,
                    self.policy.metadata.name,
                    done,
                )
        target = self.target()
        ref = self.spec.scale_target_ref
        other = self.caches.other_scaler(self.namespace, ref.kind, ref.name)
        if other is not None:
            raise errors.Refused(
                "ScaledByOther",
                f"{ref.kind} {self.namespace}/{ref.name} is also scaled by {other}: Forestall leaves it alone "
                "rather than fight over its replicas; remove the other autoscaler, or this policy",
            )
        gpus_per_replica = self.spec.capacity.gpus_per_replica
        raw_pods = self.pods(target)
        known, self._pod_states = self._pod_states, {}
        for obj in raw_pods:  # parsed once per pod version: most pods do not change between cycles
            meta = obj["metadata"]
            key = (meta.get("uid", meta["name"]), meta.get("resourceVersion", ""))
            self._pod_states[key] = known.get(key) or _pod_state(obj)
        pods = tuple(self._pod_states.values())
        self._measure(pods, raw_pods)
        nodes = self.caches.gpu_nodes(self.spec.capacity.gpu_resource_name)
        self._measure_nodes(nodes)
        self._check_costs(pods)
        provisioned, pending = self.provisioner.status()
        pending_pods = sum(1 for p in pods if p.phase == "pending")
        pods_med = list(self._pod_samples.values())
        return cluster.ClusterState(
            spec_replicas=int(target.get("spec", {}).get("replicas", 1)),
            pods=pods,
            nodes=nodes,
            provisioned_gpus=provisioned,
            pending_gpus=pending + pending_pods * gpus_per_replica,
            measured_node_provisioning_s=_median(self._node_samples.values()),
            measured_pod_start_s=_median(s[0] for s in pods_med),
            measured_model_load_s=_median(s[1] for s in pods_med),
            lead_time_samples=self.lead_time_samples(),
            deletion_cost_overwrites=self.deletion_cost_overwrites(),
            removal_order="highest-ordinal" if ref.kind == "StatefulSet" else "deletion-cost",
        )

    def pods(self, target: Obj | None = None) -> list[Obj]:
        """The target's pods (placeholders and finished pods excluded), from the cache."""
        target = target if target is not None else self.target()
        selector = target.get("spec", {}).get("selector", {})
        candidates = self.caches.pods.by_label(self.namespace, selector.get("matchLabels") or {})
        return sorted(
            (
                p
                for p in candidates
                if _matches_expressions(p, selector.get("matchExpressions") or [])
                and provisioners.PLACEHOLDER_LABEL not in (p["metadata"].get("labels") or {})
                and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            ),
            key=lambda p: str(p["metadata"]["name"]),
        )

    def lead_time_samples(self) -> int:
        return len(self._pod_samples) + len(self._node_samples)

    def deletion_cost_overwrites(self) -> dict[str, str]:
        """Pod -> the deletion cost found where this controller had written another; empty when none."""
        return dict(self._overwritten)

    # --- writes --------------------------------------------------------------------------------------------

    def set_replicas(self, replicas: int) -> None:
        ref = self.spec.scale_target_ref
        apps = client.AppsV1Api(self.api_client)
        read, replace = (
            (apps.read_namespaced_deployment_scale, apps.replace_namespaced_deployment_scale)
            if ref.kind == "Deployment"
            else (apps.read_namespaced_stateful_set_scale, apps.replace_namespaced_stateful_set_scale)
        )
        for attempt in range(1, SCALE_CONFLICT_ATTEMPTS + 1):
            scale = api.call(read, ref.name, self.namespace)
            if scale["spec"].get("replicas") == replicas:
                return
            scale["spec"] = {"replicas": replicas}
            scale.pop("status", None)
            try:
                written = api.call(replace, ref.name, self.namespace, scale)
            except errors.Conflict:
                log.info(
                    "%s/%s: scale of %s changed under us (attempt %d/%d); re-reading",
                    self.namespace,
                    self.policy.metadata.name,
                    ref.name,
                    attempt,
                    SCALE_CONFLICT_ATTEMPTS,
                )
                if attempt == SCALE_CONFLICT_ATTEMPTS:
                    raise
                continue
            cached = self.caches.workloads(ref.kind).get(self.namespace, ref.name)
            if cached is not None:
                meta = {**cached["metadata"], "resourceVersion": written["metadata"]["resourceVersion"]}
                spec = {**cached.get("spec", {}), "replicas": replicas}
                self.caches.workloads(ref.kind).apply({**cached, "metadata": meta, "spec": spec})
            return

    def annotate(self, pod: str, annotations: Mapping[str, str | None]) -> None:
        """Set (or, with None, remove) pod annotations, recording the ones cleanup must undo.

        A deletion cost is written when the pod has none or still has the one this controller wrote (so a
        raised cost can be lowered again); a different value is someone else's and is left alone
        (`state()` reports it as overwritten).
        """
        current = self.caches.pods.get(self.namespace, pod)
        if current is None:
            raise errors.NotFound(f"pod {self.namespace}/{pod} not found")
        have = current["metadata"].get("annotations") or {}
        written = finalizing.wrote(current)
        patch: dict[str, str | None] = {}
        for key, value in annotations.items():
            if key == cluster.DELETION_COST_ANNOTATION and value is not None:
                found = have.get(key)
                ours = written.get(key, self._costs_set.get(pod))
                if found is not None and found != ours:
                    continue  # someone else's value: reported by state(), never fought over
            if have.get(key) != value:
                patch[key] = value
                if key in finalizing.OWNED_KEYS:
                    if value is None:
                        written.pop(key, None)
                    else:
                        written[key] = value
        if not patch:
            return
        marker = finalizing.record(self.policy.metadata.name, written)
        if marker != have.get(finalizing.WROTE_ANNOTATION):
            patch[finalizing.WROTE_ANNOTATION] = marker
        self._patch_annotations(pod, patch)
        cost = patch.get(cluster.DELETION_COST_ANNOTATION)
        if cost is not None:
            self._costs_set[pod] = cost

    def _patch_annotations(self, pod: str, patch: Mapping[str, str | None]) -> None:
        body = {"metadata": {"annotations": dict(patch)}}
        written = api.call(
            client.CoreV1Api(self.api_client).patch_namespaced_pod,
            pod,
            self.namespace,
            body,
            _content_type="application/merge-patch+json",
        )
        self.caches.pods.apply(written)

    def release(self) -> list[str]:
        """The finalizer's work for this policy (`release_policy`)."""
        self._costs_set.clear()
        self._overwritten.clear()
        return release_policy(
            self.api_client, self.caches, namespace=self.namespace, name=self.policy.metadata.name
        )

    def provision(self, gpus: int) -> None:
        self.provisioner.provision(gpus)

    # --- measuring -----------------------------------------------------------------------------------------

    def _measure(self, pods: tuple[cluster.PodState, ...], raw: list[Obj]) -> None:
        for state, obj in zip(pods, raw, strict=True):
            uid = obj["metadata"].get("uid", state.name)
            if uid in self._pod_samples or state.ready_s is None or state.scheduled_s is None:
                continue
            running_s = _container_started(obj)
            sample: tuple[float | None, float | None]
            if running_s is not None:
                sample = (max(0.0, running_s - state.scheduled_s), max(0.0, state.ready_s - running_s))
            else:
                sample = (None, max(0.0, state.ready_s - state.scheduled_s))
            if len(self._pod_order) == self._pod_order.maxlen:
                self._pod_samples.pop(self._pod_order[0], None)
            self._pod_order.append(uid)
            self._pod_samples[uid] = sample

    def _measure_nodes(self, nodes: tuple[cluster.NodeState, ...]) -> None:
        for node in nodes:
            if node.name in self._node_samples or node.ready_s is None:
                continue
            took = node.ready_s - node.created_s
            if not 0 <= took <= MAX_NODE_PROVISIONING_S:
                continue
            if len(self._node_order) == self._node_order.maxlen:
                self._node_samples.pop(self._node_order[0], None)
            self._node_order.append(node.name)
            self._node_samples[node.name] = took

    def _check_costs(self, pods: tuple[cluster.PodState, ...]) -> None:
        present = {p.name: p for p in pods}
        for name in list(self._costs_set):
            pod = present.get(name)
            if pod is None:
                self._costs_set.pop(name)
                self._overwritten.pop(name, None)
                continue
            found = pod.annotations.get(cluster.DELETION_COST_ANNOTATION)
            if found != self._costs_set[name] and name not in self._overwritten:
                log.warning(
                    "%s/%s: pod-deletion-cost of pod %s was overwritten: wrote %s, found %s "
                    "(Karpenter's pod-deletion-cost management or another controller?)",
                    self.namespace,
                    self.policy.metadata.name,
                    name,
                    self._costs_set[name],
                    found,
                )
                self._overwritten[name] = found if found is not None else ""


def release_policy(api_client: client.ApiClient, caches: Caches, *, namespace: str, name: str) -> list[str]:
    """The finalizer's work (`controller.kube.finalizing`): release all capacity held for policy `name` and
    remove the annotations this controller wrote on its pods; one line per object touched. Needs no parsed
    spec, so a policy deleted while invalid is cleaned up too."""
    done = provisioners.release_all(api_client, caches, namespace=namespace, name=name)
    core = client.CoreV1Api(api_client)
    for obj in caches.pods.items(namespace):
        if finalizing.owner_of_record(obj) != name:
            continue
        patch = finalizing.unmark_patch(obj)
        if not patch:
            continue
        try:
            written = api.call(
                core.patch_namespaced_pod,
                obj["metadata"]["name"],
                namespace,
                {"metadata": {"annotations": patch}},
                _content_type="application/merge-patch+json",
            )
        except errors.NotFound:
            continue
        caches.pods.apply(written)
        done.append(f"unmarked pod {obj['metadata']['name']}")
    return done


# --- object -> state ---------------------------------------------------------------------------------------


def _condition(obj: Obj, kind: str) -> Obj | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def _pod_state(obj: Obj) -> cluster.PodState:
    meta = obj["metadata"]
    scheduled = _condition(obj, "PodScheduled")
    ready = _condition(obj, "Ready")
    scheduled_s = (
        api.parse_time(scheduled.get("lastTransitionTime"))
        if scheduled and scheduled["status"] == "True"
        else None
    )
    ready_s = api.parse_time(ready.get("lastTransitionTime")) if ready and ready["status"] == "True" else None
    node = obj.get("spec", {}).get("nodeName")
    phase: cluster.PodPhase
    if meta.get("deletionTimestamp"):
        phase = "terminating"
    elif ready_s is not None:
        phase = "ready"
    elif not node:
        phase = "pending"
    else:
        phase = "starting"
    return cluster.PodState(
        name=meta["name"],
        phase=phase,
        created_s=api.parse_time(meta.get("creationTimestamp")) or 0.0,
        scheduled_s=scheduled_s,
        ready_s=ready_s,
        node=node,
        annotations=dict(meta.get("annotations") or {}),
    )


def _container_started(obj: Obj) -> float | None:
    started = [
        api.parse_time(status.get("state", {}).get("running", {}).get("startedAt"))
        for status in obj.get("status", {}).get("containerStatuses") or []
    ]
    known = [s for s in started if s is not None]
    return max(known) if known else None


def _node_state(obj: Obj, resource_name: str) -> cluster.NodeState | None:
    allocatable = obj.get("status", {}).get("allocatable") or obj.get("status", {}).get("capacity") or {}
    raw = allocatable.get(resource_name)
    if raw is None:
        return None
    try:
        gpus = int(str(raw))
    except ValueError:
        return None
    if gpus <= 0:
        return None
    ready = _condition(obj, "Ready")
    is_ready = bool(ready and ready.get("status") == "True")
    return cluster.NodeState(
        name=obj["metadata"]["name"],
        gpus=gpus,
        ready=is_ready,
        created_s=api.parse_time(obj["metadata"].get("creationTimestamp")) or 0.0,
        ready_s=api.parse_time(ready.get("lastTransitionTime")) if ready and is_ready else None,
        gpu_product=(obj["metadata"].get("labels") or {}).get(cluster.GPU_PRODUCT_LABEL),
    )


def _matches_expressions(obj: Obj, expressions: list[Obj]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for expr in expressions:
        key, op, values = expr.get("key"), expr.get("operator"), set(expr.get("values") or [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _median(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return float(statistics.median(known)) if known else None
