"""Kubernetes discovery against the in-test API server (real REST paths, list + watch): EndpointSlice
conditions, pod start time (warming), the drain annotation and the capacity-weight annotation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from contract import clock as clock_mod
from tests.fakes.balancer_env import balancer, completion_body, emulators, read_sse, start_app, wait_until
from tests.fakes.kube_api import FakeKubeApi

NS = "inference"
FAST = {"slots": 4, "ttft_s": 0.0, "seconds_per_token": 0.0}


def _pod(name: str, *, started_unix: float, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {"phase": "Running", "startTime": clock_mod.utc_iso(started_unix)},
    }


def _slice(name: str, pod: str, port: int, **conditions: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": "vllm"}},
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["127.0.0.1"],
                "conditions": {"ready": True, "serving": True, "terminating": False, **conditions},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": pod},
            }
        ],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


async def test_endpointslices_drive_backends_states_and_weights() -> None:
    fake = clock_mod.FakeClock()
    async with FakeKubeApi() as api, emulators(FAST, FAST) as addrs:
        ports = [int(a.rsplit(":", 1)[1]) for a in addrs]
        api.put(
            _pod(
                "worker-0", started_unix=fake.now() - 3600, annotations={"forestall.dev/capacity-weight": "2"}
            )
        )
        api.put(_pod("worker-1", started_unix=fake.now() - 5))
        api.put(_slice("vllm-a", "worker-0", ports[0]))
        api.put(_slice("vllm-b", "worker-1", ports[1]))
        async with (
            balancer(clock=fake, kube_services=[f"{NS}/vllm"], kube_api_url=api.url, slow_start_s=30.0) as lb,
            aiohttp.ClientSession() as http,
        ):
            pool = lb.bal.pool.backends
            await wait_until(
                lambda: len(pool) == 2 and pool[addrs[0]].pod is not None, what="slices and pods seen"
            )
            old, new = pool[addrs[0]], pool[addrs[1]]
            await wait_until(lambda: old.weight == 2.0, what="pods listed")
            assert (old.pod, old.state(fake.monotonic())) == ("worker-0", "ready")
            assert (new.pod, new.state(fake.monotonic())) == ("worker-1", "warming")  # started 5 s ago
            assert lb.bal.warmup.factor(new) == 5.0 / 30.0

            async with http.post(f"{lb.url}/v1/completions", json=completion_body()) as resp:
                assert (await read_sse(resp))[-1] == "[DONE]"

            api.put(_slice("vllm-a", "worker-0", ports[0], terminating=True, ready=False))
            await wait_until(lambda: old.draining, what="terminating endpoint drained, not cut")
            assert old.present and lb.bal.choose() is new

            api.put(
                _pod(
                    "worker-1", started_unix=fake.now() - 5, annotations={"forestall.dev/drain": "1700000000"}
                )
            )
            await wait_until(lambda: new.draining, what="drain annotation applied")
            assert lb.bal.choose() is None

            api.delete("discovery.k8s.io", "endpointslices", NS, "vllm-a")
            await wait_until(lambda: addrs[0] not in pool, what="deleted endpoint removed")
            api.put(_slice("vllm-b", "worker-1", ports[1], ready=False))
            await wait_until(lambda: addrs[1] not in pool, what="unready endpoint removed")
            assert [c.verb for c in api.calls(resource="endpointslices")][:2] == ["list", "watch"]


async def test_the_watcher_rereads_a_rotated_service_account_token(tmp_path: Path) -> None:
    """Low: the EndpointSlice watcher read its service-account token once, though projected tokens rotate."""
    seen: list[str] = []
    release = asyncio.Event()

    async def api(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        if request.query.get("watch") == "true":
            await release.wait()  # a watch ends when the test says so (as the server's timeout would)
            return web.Response(text="", content_type="application/json")
        return web.json_response({"metadata": {"resourceVersion": "1"}, "items": []})

    app = web.Application()
    app.router.add_get("/{tail:.*}", api)
    runner, address = await start_app(app)
    token = tmp_path / "token"
    token.write_text("first\n")
    try:
        async with balancer(
            kube_services=[f"{NS}/vllm"], kube_api_url=f"http://{address}", kube_token_file=token
        ):
            await wait_until(lambda: len(seen) >= 4, what="both lists and both watches made")
            assert set(seen) == {"Bearer first"}
            token.write_text("second\n")  # the kubelet rotates the projected token
            release.set()
            await wait_until(lambda: "Bearer second" in seen, what="a new watch with the rotated token")
            release.clear()
    finally:
        await runner.cleanup()
