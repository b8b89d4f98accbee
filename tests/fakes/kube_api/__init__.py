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
deterministically, so tests decide when pods appear, become Ready and go away. Scale-down removes pods in the
ReplicaSet controller's order (`emulation.lifecycle.pods_to_delete`: unassigned, then pending, then not Ready,
then the lowest `controller.kubernetes.io/pod-deletion-cost`, ...).

It also models finalizers, ownerReference garbage collection, pagination, Pod Security admission, the CEL
cost check at CRD creation and injected faults (5xx bursts, 429 with Retry-After, hangs, watch 410s, a full
outage). `README.md` beside this file lists what it does not model.

Modules: `server` (FakeKubeApi: HTTP, store, watch, discovery, the workload emulation), `rest` (recorded
calls, Status errors, patches, selectors), `schemas` (resource types and validation), `objects` (test
helpers and object builders), `admission` (Pod Security), `cel_cost` (the CRD cost check).
"""

from __future__ import annotations

from tests.fakes.kube_api.objects import advance_until, deployment, eventually, gpu_node, scaling_policy
from tests.fakes.kube_api.rest import ApiCall, ApiError
from tests.fakes.kube_api.schemas import (
    CAPACITY_BUFFER_SCHEMA,
    KUBE_VERSION,
    PROVISIONING_REQUEST_SCHEMA,
    ResourceType,
    default_resources,
    validate_builtin,
)
from tests.fakes.kube_api.server import BOOKMARK_INTERVAL_S, HISTORY_LIMIT, FakeKubeApi

__all__ = [
    "BOOKMARK_INTERVAL_S",
    "CAPACITY_BUFFER_SCHEMA",
    "HISTORY_LIMIT",
    "KUBE_VERSION",
    "PROVISIONING_REQUEST_SCHEMA",
    "ApiCall",
    "ApiError",
    "FakeKubeApi",
    "ResourceType",
    "advance_until",
    "default_resources",
    "deployment",
    "eventually",
    "gpu_node",
    "scaling_policy",
    "validate_builtin",
]
