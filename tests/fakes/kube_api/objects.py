"""Helpers for tests of the fake API server's clients: waiting on watch-fed state, and object builders."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from contract import clock as clock_mod
from tests.fakes import specs

Obj = dict[str, Any]


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
    body = specs.wire(
        demand={
            "prometheus": {"query": f'sum(forestall_balancer_active_streams{{namespace="{namespace}"}})'}
        },
        streams_per_replica=10,
        gpus_per_replica=1,
        gpus_per_node=8,
        min_replicas=1,
        max_replicas=20,
        scaleTargetRef={"apiVersion": "apps/v1", "kind": "Deployment", "name": target or name},
    )
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
