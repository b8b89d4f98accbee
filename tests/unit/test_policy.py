"""The ScalingPolicy API: the pydantic model and the generated CRD schema accept and reject the same things."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller import crd, errors, policy
from tests.fakes import crd_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "manifests" / "examples" / "scalingpolicy-vllm.yaml"
K8S_VERSION = "1.34.0"
"""A current Kubernetes release that kubernetes-validate ships schemas for."""


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd_schema.crd_schema(crd.definition())


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `doc` with `path` (dotted) set to `value`, or deleted when value is `...`."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


def test_checked_in_crd_is_generated_from_the_model() -> None:
    """Regenerate the CRD and diff: run `forestall crd -o manifests/crd/scalingpolicies.forestall.dev.yaml`."""
    assert crd.CRD_FILE.read_text() == crd.render()


def test_crd_is_a_valid_customresourcedefinition() -> None:
    kubernetes_validate.validate(crd.definition(), K8S_VERSION, strict=True)


def test_crd_names_and_subresources() -> None:
    spec = crd.definition()["spec"]
    assert spec["group"] == "forestall.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["sp"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}


def test_example_is_valid_for_model_and_schema(example: dict[str, Any], schema: dict[str, Any]) -> None:
    parsed = policy.parse(example)
    assert parsed.spec.capacity.streams_per_replica == 32
    assert parsed.spec.lead_time.total_s == 360 + 60 + 120
    assert crd_schema.validate(schema, example) == []


def test_defaults_agree_between_model_and_schema(example: dict[str, Any], schema: dict[str, Any]) -> None:
    """The API server's defaulting and pydantic's produce the same spec for a minimal policy."""
    minimal = {
        "apiVersion": policy.API_VERSION,
        "kind": policy.KIND,
        "metadata": {"name": "m"},
        "spec": {
            "scaleTargetRef": {"kind": "Deployment", "name": "w"},
            "demand": {"balancer": {"service": "b"}},
            "capacity": {"streamsPerReplica": 4},
            "replicas": {"max": 3},
        },
    }
    defaulted = crd_schema.apply_defaults(schema, copy.deepcopy(minimal))
    from_model = policy.parse(minimal).spec.model_dump(by_alias=True, exclude_none=True)
    assert defaulted["spec"] == _drop_empty_lists(from_model)


def _drop_empty_lists(node: Any) -> Any:
    """pydantic dumps `gpuTypes: []`; the API server leaves an absent list absent."""
    if isinstance(node, dict):
        return {k: _drop_empty_lists(v) for k, v in node.items() if v != []}
    return node


# (path, value, words the pydantic message must contain)
INVALID = [
    ("spec.replicas", {"min": 5, "max": 2}, ["replicas.min", "replicas.max", "min=5", "max=2"]),
    ("spec.forecast.quantile", 1.5, ["spec.forecast.quantile", "1.5"]),
    ("spec.forecast.quantile", 0.5, ["spec.forecast.quantile", "0.5"]),
    ("spec.scaleTargetRef", ..., ["spec.scaleTargetRef", "missing"]),
    ("spec.provisioner.type", "magic", ["spec.provisioner.type", "magic"]),
    ("spec.leadTime.nodeProvisioningSeconds", -5, ["spec.leadTime.nodeProvisioningSeconds", "-5"]),
    ("spec.colour", "blue", ["spec.colour", "unknown field"]),
    ("spec.scaleTargetRef.kind", "Pod", ["spec.scaleTargetRef.kind", "Pod"]),
    ("spec.capacity.streamsPerReplica", 0, ["spec.capacity.streamsPerReplica", "0"]),
    ("spec.demand", {}, ["demand needs prometheus or balancer"]),
    (
        "spec.scaleDown",
        {"stabilizationWindowSeconds": 60, "drainTimeoutSeconds": 600},
        ["drainTimeoutSeconds=600", "stabilizationWindowSeconds=60"],
    ),
    ("spec.provisioner", {"type": "pods", "placeholder": {}}, ["provisioner.placeholder", "'pods'"]),
    ("spec.mode", "yolo", ["spec.mode", "yolo"]),
]


@pytest.mark.parametrize(("path", "value", "words"), INVALID, ids=[f"{p}={v!r}" for p, v, _ in INVALID])
def test_invalid_policy_rejected_by_model_and_schema(
    example: dict[str, Any], schema: dict[str, Any], path: str, value: Any, words: list[str]
) -> None:
    doc = _with(example, path, value)
    with pytest.raises(errors.InvalidPolicy) as caught:
        policy.parse(doc)
    text = "\n".join(caught.value.lines)
    for word in words:
        assert word in text
    problems = crd_schema.validate(schema, doc)
    assert problems, f"the CRD schema accepted what the model rejects: {text}"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.replicas", {"min": 0, "max": 1}),
        ("spec.replicas", {"min": 3, "max": 3}),
        ("spec.forecast.quantile", 0.99),
        ("spec.provisioner", {"type": "placeholder", "placeholder": {"priorityClassName": "low"}}),
        ("spec.provisioner", {"type": "provisioningRequest", "provisioningRequest": {}}),
        ("spec.provisioner", {"type": "capacityBuffer"}),
        ("spec.scaleDown", {"stabilizationWindowSeconds": 300, "drainTimeoutSeconds": 300}),
        ("spec.mode", "dryRun"),
        ("spec.demand", {"prometheus": {"query": "sum(x)"}}),
    ],
)
def test_valid_edge_cases_accepted_by_model_and_schema(
    example: dict[str, Any], schema: dict[str, Any], path: str, value: Any
) -> None:
    doc = _with(example, path, value)
    policy.parse(doc)
    assert crd_schema.validate(schema, doc) == []


def test_cel_rule_catches_what_only_cel_can(example: dict[str, Any], schema: dict[str, Any]) -> None:
    """min > max passes every per-field bound; only the x-kubernetes-validations rule rejects it."""
    doc = _with(example, "spec.replicas", {"min": 9, "max": 4})
    problems = crd_schema.validate(schema, doc)
    assert problems == ["spec.replicas: replicas.min must be <= replicas.max: lower min or raise max"]


def test_status_round_trips_through_schema(example: dict[str, Any], schema: dict[str, Any]) -> None:
    status = policy.ScalingPolicyStatus(
        observed_demand=12.0,
        forecast=policy.ForecastStatus(value=30.5, quantile=0.95, horizon_s=540, model="auto"),
        desired_replicas=3,
        conditions=[
            policy.Condition(
                type="DemandDataAvailable",
                status="False",
                reason="PrometheusUnreachable",
                message="connection refused",
                last_transition_time="2026-11-23T16:00:00Z",
            )
        ],
    )
    doc = dict(example, status=status.model_dump(by_alias=True, exclude_none=True))
    assert crd_schema.validate(schema, doc) == []
    assert policy.parse(doc).status == status


def test_readme_field_reference_is_generated_from_the_model() -> None:
    """The README's "Tune" table is `crd.field_reference()`; regenerate it when the API changes."""
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- policy-reference:start -->\n", "<!-- policy-reference:end -->"
    assert start in text and end in text
    embedded = text.split(start, 1)[1].split(end, 1)[0]
    assert embedded == crd.field_reference()
