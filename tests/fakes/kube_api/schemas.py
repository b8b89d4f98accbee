"""What the fake API server serves and how it validates: resource types, schemas, kubernetes-validate.

Built-in kinds validate against the Kubernetes OpenAPI schemas shipped by `kubernetes-validate` (strict,
`KUBE_VERSION`), loaded once per kind (the library reloads them on every call). Custom resources validate
through `tests.fakes.crd_schema`: the ScalingPolicy against the CRD generated from `controller.policy`, the
cluster-autoscaler kinds against compact structural schemas written from their published CRDs, the
InferencePool against the Gateway API Inference Extension's released CRD (tests/fakes/gie/, unchanged).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kv_utils

from controller import crd as crd_mod
from tests.fakes import crd_schema

Obj = dict[str, Any]

GIE_INFERENCEPOOL_CRD = Path(__file__).resolve().parent.parent / "gie" / "inferencepools.yaml"
"""The GIE v1.6.0 InferencePool CRD (`inference.networking.k8s.io/v1`), as released."""


@functools.cache
def inferencepool_schema() -> Obj:
    """The released InferencePool CRD's v1 `openAPIV3Schema`."""
    schema: Obj = crd_schema.crd_schema(yaml.safe_load(GIE_INFERENCEPOOL_CRD.read_text()), "v1")
    return schema


KUBE_VERSION = "1.34"
"""Kubernetes version whose schemas validate built-in kinds (kubernetes-validate, strict)."""


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

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
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
                                    "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN}
                                },
                            },
                        },
                    },
                },
                "provisioningClassName": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
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
        ResourceType(
            "autoscaling",
            ("v2",),
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            subresources=("status",),
        ),
        ResourceType("events.k8s.io", ("v1",), "events", "Event"),
        ResourceType("discovery.k8s.io", ("v1",), "endpointslices", "EndpointSlice"),
        ResourceType("scheduling.k8s.io", ("v1",), "priorityclasses", "PriorityClass", namespaced=False),
        ResourceType(
            "apiextensions.k8s.io",
            ("v1",),
            "customresourcedefinitions",
            "CustomResourceDefinition",
            namespaced=False,
            subresources=("status",),
        ),
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
        ResourceType(
            "inference.networking.k8s.io",
            ("v1",),
            "inferencepools",
            "InferencePool",
            subresources=("status",),
            crd_schema=inferencepool_schema(),
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
