"""One builder for the ScalingPolicy specs tests need, instead of a dict literal in every test module.

`wire()` gives the camelCase spec as the API server stores it (for kube objects and YAML), `spec()` the same
validated into `controller.policy.ScalingPolicySpec`. Keyword arguments cover what tests vary most (capacity,
replica bounds, lead times, the demand source); any other top-level section is passed whole by its wire name
(`scaleDown={...}`, `forecast={...}`) and replaces the default.

What it does not do: defaults of its own beyond what makes a spec valid and small (the API's defaults stay the
API's, so a test that leaves a field out still tests them).
"""

from __future__ import annotations

from typing import Any

from controller import policy

PROMETHEUS_QUERY = "sum(forestall_balancer_active_streams)"


def wire(
    *,
    target: str = "worker",
    kind: str = "Deployment",
    streams_per_replica: int = 4,
    gpus_per_replica: int | None = None,
    gpus_per_node: int | None = None,
    seconds_per_token: float | None = None,
    min_replicas: int | None = None,
    max_replicas: int = 20,
    lead_s: tuple[float, float, float] | None = None,
    demand: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A valid spec in wire form. `lead_s` is (node provisioning, pod start, model load) seconds."""
    capacity: dict[str, Any] = {"streamsPerReplica": streams_per_replica}
    for key, value in (
        ("gpusPerReplica", gpus_per_replica),
        ("gpusPerNode", gpus_per_node),
        ("secondsPerToken", seconds_per_token),
    ):
        if value is not None:
            capacity[key] = value
    replicas: dict[str, Any] = {"max": max_replicas}
    if min_replicas is not None:
        replicas["min"] = min_replicas
    raw: dict[str, Any] = {
        "scaleTargetRef": {"kind": kind, "name": target},
        "demand": demand if demand is not None else {"prometheus": {"query": PROMETHEUS_QUERY}},
        "capacity": capacity,
        "replicas": replicas,
    }
    if lead_s is not None:
        node, pod, load = lead_s
        raw["leadTime"] = {"nodeProvisioningSeconds": node, "podStartSeconds": pod, "modelLoadSeconds": load}
    raw.update(sections)
    return raw


def spec(**kwargs: Any) -> policy.ScalingPolicySpec:
    """`wire(**kwargs)` validated as the controller reads it."""
    return policy.ScalingPolicySpec.model_validate(wire(**kwargs))
