"""The picker discovers its backends from an InferencePool (GIE v1, the released CRD's schema) and its pods on the
in-test API server: selector and target port, readiness, the drain annotation, terminating pods, a selector
change; and serves the same /signals and /metrics as a balancer replica."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from balancer import config as config_mod
from balancer import picker
from contract import clock as clock_mod
from tests.fakes.balancer_env import fetch_json, wait_until
from tests.fakes.kube_api import FakeKubeApi

NS = "inference"


def _pool(app: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "llm", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "targetPorts": [{"number": port}],
            "endpointPickerRef": {
                "name": "forestall-picker",
                "port": {"number": 9002},
                "failureMode": "FailOpen",
            },
        },
    }


def _pod(
    name: str, ip: str, *, app: str = "vllm", ready: bool = True, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "startTime": clock_mod.utc_iso(clock_mod.SYSTEM.now() - 3600),
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@contextlib.asynccontextmanager
async def _picker(api: FakeKubeApi) -> AsyncIterator[picker.PickerServed]:
    config = config_mod.BalancerConfig.model_validate(
        {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "kube_inference_pools": [f"{NS}/llm"],
            "kube_api_url": api.url,
        }
    )
    served = await picker.serve(config)
    try:
        yield served
    finally:
        await served.close(0.1)


def _states(served: picker.PickerServed) -> dict[str, str]:
    now = served.bal.clock.monotonic()
    return {b.address: b.state(now) for b in served.bal.pool.present()}


async def test_inferencepool_selector_port_readiness_drain_and_termination() -> None:
    async with FakeKubeApi() as api:
        api.put(_pool("vllm", 8000))
        api.put(_pod("w0", "10.0.0.1"))
        api.put(_pod("w1", "10.0.0.2", annotations={"forestall.dev/drain": "1796000000"}))
        api.put(_pod("w2", "10.0.0.3", ready=False))  # starting: not a backend yet
        api.put(_pod("other", "10.0.0.9", app="embedder"))  # not selected
        async with _picker(api) as served, aiohttp.ClientSession() as http:
            await wait_until(lambda: len(_states(served)) == 2, what="the pool's two ready pods discovered")
            assert _states(served) == {"10.0.0.1:8000": "ready", "10.0.0.2:8000": "draining"}
            assert served.bal.pool.backends["10.0.0.1:8000"].pod == "w0"

            api.put(_pod("w2", "10.0.0.3"))  # became ready
            await wait_until(lambda: "10.0.0.3:8000" in _states(served), what="w2 joined when ready")
            terminating = _pod("w0", "10.0.0.1")
            terminating["metadata"]["deletionTimestamp"] = clock_mod.utc_iso(clock_mod.SYSTEM.now())
            # A pod in its grace period: the fake API server completes a deletion once no finalizer holds
            # the object (it does not model the kubelet's graceful termination), so one stands in for it.
            terminating["metadata"]["finalizers"] = ["test.forestall.dev/grace-period"]
            api.put(terminating)
            await wait_until(
                lambda: _states(served).get("10.0.0.1:8000") == "draining", what="terminating pod drained"
            )

            signals = await fetch_json(http, f"http://127.0.0.1:{served.admin_port}/signals")
            assert {b["address"]: b["state"] for b in signals["backends"]} == {
                "10.0.0.1:8000": "draining",
                "10.0.0.2:8000": "draining",
                "10.0.0.3:8000": "ready",  # started an hour ago: its warm-up is dated from the pod start
            }
            async with http.get(f"http://127.0.0.1:{served.admin_port}/metrics") as resp:
                assert resp.status == 200
                assert "forestall_balancer_active_streams" in await resp.text()

            api.put(_pool("embedder", 9000))  # the pool re-targets: other pods, other port
            await wait_until(
                lambda: set(_states(served)) == {"10.0.0.9:9000"}, what="selector change re-targets the pool"
            )
