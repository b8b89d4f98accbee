"""The end-to-end test's own fakes do what they claim: the fake kubelet/ReplicaSet and the load generator.

`tests.fakes.e2e_kubelet.FakeKubelet` must run a pod per replica behind a ready EndpointSlice, remove the
pod with the lowest pod-deletion-cost on a scale-down, and stop its server; `tests.fakes.e2e_load` must tell
a completed stream from a cut, rejected or abandoned one. If these were wrong, the end-to-end claims (zero streams cut, idle pods
removed) would prove nothing.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from balancer import proxy
from tests.fakes import e2e_kubelet, e2e_load, kube_api
from tests.fakes.balancer_env import emulators, scripted_backend

NS = "e2e"
FAST = e2e_kubelet.Delays(schedule_s=0.01, container_start_s=0.01, model_load_s=0.01)


def slices(api: kube_api.FakeKubeApi) -> dict[str, dict[str, object]]:
    out = {}
    for item in api.objects("discovery.k8s.io", "endpointslices", NS):
        endpoint = item["endpoints"][0]
        out[endpoint["targetRef"]["name"]] = {"port": item["ports"][0]["port"], **endpoint["conditions"]}
    return out


async def test_kubelet_serves_each_replica_and_removes_the_lowest_deletion_cost_pod_first() -> None:
    async with kube_api.FakeKubeApi(bookmark_interval_s=0.2) as api:
        api.put(kube_api.deployment("w", NS, replicas=3))
        kubelet = e2e_kubelet.FakeKubelet(
            api, namespace=NS, deployment="w", service="w", delays=FAST, poll_s=0.01
        )
        async with kubelet, aiohttp.ClientSession() as http:
            await kube_api.eventually(lambda: len(kubelet.ready_pods()) == 3, "three Ready pods")
            await kube_api.eventually(lambda: len(slices(api)) == 3, "three EndpointSlices")
            assert all(s["ready"] for s in slices(api).values())
            for pod, s in slices(api).items():
                body = {"model": "m", "stream": True, "max_tokens": 2, "messages": []}
                async with http.post(f"http://127.0.0.1:{s['port']}/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200, pod
                    assert b"data: [DONE]" in await resp.read()
            node = api.get("", "nodes", "", kubelet.node)
            assert node is not None and node["metadata"]["creationTimestamp"] < str(
                node["status"]["conditions"][0]["lastTransitionTime"]
            )

            victim = kubelet.ready_pods()[1]
            pod = api.get("", "pods", NS, victim)
            assert pod is not None
            pod["metadata"].setdefault("annotations", {})[e2e_kubelet.DELETION_COST] = "-5"
            api.put(pod)
            victim_port = slices(api)[victim]["port"]
            workload = api.get("apps", "deployments", NS, "w")
            assert workload is not None
            workload["spec"]["replicas"] = 2
            api.put(workload)
            await kube_api.eventually(lambda: bool(kubelet.removed), "a pod removed")
            assert [r.pod for r in kubelet.removed] == [victim]
            assert kubelet.removed[0].streams_left == 0
            assert kubelet.removed[0].annotations[e2e_kubelet.DELETION_COST] == "-5"
            await kube_api.eventually(lambda: victim not in slices(api), "the victim's EndpointSlice deleted")
            assert [n for _, n in kubelet.replica_history] == [3, 2]
            assert kubelet.replicas_at_least(3) is not None and kubelet.replicas_at_least(4) is None
            try:
                async with http.get(f"http://127.0.0.1:{victim_port}/health") as resp:
                    answered = resp.status
            except aiohttp.ClientConnectionError:
                answered = None
            assert answered is None, "the removed pod's server still answers"


async def test_load_generator_tells_completed_cut_and_abandoned_streams_apart() -> None:
    async def one_chunk_then_close(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\n')
        assert request.transport is not None
        request.transport.close()  # the backend dies mid-stream
        return resp

    async with emulators({"slots": 4, "ttft_s": 0.0, "seconds_per_token": 0.01}) as (address,):
        async with e2e_load.LoadGenerator(f"http://{address}", tokens=5) as load:
            await load.run([(0.0, 50.0)], until_s=0.2)
            load.abandon_one()
            assert await load.drain(timeout_s=10)
        out = load.outcomes
        assert out.started >= 5
        assert (out.ok, out.cut, out.error, out.abandoned) == (out.started - 1, 0, 0, 1)
        assert load.peak_concurrency() >= 1 and load.concurrency[-1][1] == 0

    runner, address = await scripted_backend(one_chunk_then_close)
    try:
        async with e2e_load.LoadGenerator(f"http://{address}", tokens=5) as load:
            await load.run([(0.0, 20.0)], until_s=0.2)
            assert await load.drain(timeout_s=10)
        assert load.outcomes.started >= 2
        assert load.outcomes.cut == load.outcomes.started and load.outcomes.ok == 0
    finally:
        await runner.cleanup()


async def test_load_generator_counts_a_stream_ended_by_an_error_event_as_cut() -> None:
    """What the balancer sends when a backend dies mid-stream: an error event and a clean end of the body."""

    async def error_event_then_end(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\n')
        await resp.write(proxy.TERMINAL_SSE_ERROR)
        await resp.write_eof()
        return resp

    async def overloaded(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503)

    runner, address = await scripted_backend(error_event_then_end)
    try:
        async with e2e_load.LoadGenerator(f"http://{address}", tokens=5) as load:
            await load.run([(0.0, 20.0)], until_s=0.2)
            assert await load.drain(timeout_s=10)
        out = load.outcomes
        assert out.started >= 2 and out.cut == out.started
        assert all("upstream_error" in e for e in out.errors)
    finally:
        await runner.cleanup()
    runner, address = await scripted_backend(overloaded)
    try:
        async with e2e_load.LoadGenerator(f"http://{address}", tokens=5) as load:
            await load.run([(0.0, 20.0)], until_s=0.2)
            assert await load.drain(timeout_s=10)
        assert load.outcomes.started >= 2 and load.outcomes.rejected == load.outcomes.started
    finally:
        await runner.cleanup()


def test_rate_profile_is_linear_between_points_and_flat_outside() -> None:
    profile = [(10.0, 1.0), (20.0, 11.0)]
    assert [e2e_load.rate_at(profile, t) for t in (0.0, 10.0, 15.0, 20.0, 99.0)] == [
        1.0,
        1.0,
        6.0,
        11.0,
        11.0,
    ]
