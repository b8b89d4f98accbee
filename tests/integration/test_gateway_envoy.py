"""`forestall picker` behind a real Envoy 1.40 on loopback: the Gateway API Inference Extension picker protocol.

Envoy carries the bytes; the picker (in this test's loop) chooses. What is shown: streams spread by least load
and hold their lease to their very end (finished, client gone, backend dead); MCP sessions stick and stateless MCP
requests route by method and name; a subset hint is obeyed; drained backends get nothing new; a dead backend is
retried on the fallback endpoint; and the picker being down fails open or closed as configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web
from mcp import Client

from emulation import processes
from tests.fakes.balancer_env import completion_body, emulators, read_sse, scripted_backend, wait_until
from tests.fakes.balancer_mcp import mcp_servers
from tests.fakes.gateway_env import gateway

SLOW = {"slots": 64, "ttft_s": 0.0, "seconds_per_token": 0.05}
"""Backends that stream one token every 50 ms and never queue: a 40-token stream lasts two seconds."""


def _served_by(events: list[str]) -> str:
    return str(json.loads(events[0])["model"])


async def test_streams_spread_by_least_load_and_hold_their_lease_to_the_last_byte(tmp_path: Path) -> None:
    async with (
        emulators(SLOW, SLOW, SLOW) as addrs,
        gateway(addrs, workdir=tmp_path) as gw,
        aiohttp.ClientSession() as http,
    ):
        first_events = asyncio.Event()
        seen: list[str] = []

        async def stream(tokens: int) -> list[str]:
            async with http.post(f"{gw.url}/v1/completions", json=completion_body(tokens=tokens)) as resp:
                assert resp.status == 200
                first = (await resp.content.readline()).decode()
                seen.append(first)
                if len(seen) == 6:
                    first_events.set()
                rest = await read_sse(resp)
            return [first[5:].strip(), *rest]

        tasks = [asyncio.create_task(stream(40)) for _ in range(6)]
        await first_events.wait()
        # Every stream has its first event: headers are long gone, yet all six still count as load.
        assert gw.active() == 6
        assert sorted(gw.active(a) for a in addrs) == [2, 2, 2]
        results = await asyncio.gather(*tasks)
        assert [(r[-1], len(r)) for r in results] == [("[DONE]", 41)] * 6
        assert Counter(_served_by(r) for r in results) == {"gpu-0": 2, "gpu-1": 2, "gpu-2": 2}
        await wait_until(lambda: gw.active() == 0, what="every lease released after the streams ended")
        assert sum(gw.bal.pool.backends[a].completed for a in addrs) == 6
        assert all(not gw.bal.pool.backends[a].failed for a in addrs)


async def test_client_leaving_mid_stream_releases_the_lease(tmp_path: Path) -> None:
    async with (
        emulators(SLOW) as addrs,
        gateway(addrs, workdir=tmp_path) as gw,
        aiohttp.ClientSession() as http,
    ):
        resp = await http.post(f"{gw.url}/v1/completions", json=completion_body(tokens=400))
        assert resp.status == 200
        await resp.content.readline()
        assert gw.active(addrs[0]) == 1
        resp.close()  # the client goes away 20 s before the stream would end
        await wait_until(lambda: gw.active() == 0, what="lease released when the client left")
        assert gw.bal.pool.backends[addrs[0]].failed == {}


async def test_backend_dying_mid_stream_releases_the_lease(tmp_path: Path) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"model": "dying"}\n\n')
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.close()  # dies mid-stream
        return resp

    runner, address = await scripted_backend(endless)
    try:
        async with gateway([address], workdir=tmp_path) as gw, aiohttp.ClientSession() as http:
            async with http.post(f"{gw.url}/v1/completions", json=completion_body(tokens=4)) as resp:
                assert resp.status == 200
                await resp.content.readline()
                assert gw.active(address) == 1
                try:
                    await resp.read()
                except aiohttp.ClientPayloadError:
                    pass  # the truncated body, as the backend left it
            await wait_until(lambda: gw.active() == 0, what="lease released when the backend died")
    finally:
        await runner.cleanup()


async def test_legacy_mcp_sessions_stick_through_the_gateway_and_unknown_ones_get_404(tmp_path: Path) -> None:
    async with (
        mcp_servers(3) as addrs,
        gateway(addrs, workdir=tmp_path, session_epsilon=0.25) as gw,
        aiohttp.ClientSession() as http,
    ):
        homes: list[set[str]] = []
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(Client(f"{gw.url}/mcp", mode="legacy")) for _ in range(6)
            ]
            assert len(gw.bal.sessions) == 6  # each initialize was recognised in its body and bound
            for client in clients:
                homes.append({await _whoami(client) for _ in range(4)})
            assert all(len(h) == 1 for h in homes)  # sticky
            assert (
                max(Counter(next(iter(h)) for h in homes).values()) <= 3
            )  # ceil(1.25 * 6 / 3) under the bound
        assert len(gw.bal.sessions) == 0  # DELETE ended each one
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        async with http.post(f"{gw.url}/mcp", json=body, headers={"Mcp-Session-Id": "never-issued"}) as resp:
            assert resp.status == 404
            assert "initialize a new session" in (await resp.json())["error"]["message"]
        await wait_until(lambda: gw.active() == 0, what="no lease left")


async def test_stateless_mcp_requests_route_by_method_and_name_and_tool_errors_count(tmp_path: Path) -> None:
    async with mcp_servers(3) as addrs:
        backends = [
            {"address": addrs[0], "methods": ["tools/call"]},
            {"address": addrs[1], "methods": ["tools/call"]},
            {"address": addrs[2], "methods": ["server/discover", "tools/list"]},
        ]
        async with gateway(backends, workdir=tmp_path) as gw:
            async with Client(f"{gw.url}/mcp") as client:
                # Same method and name -> the same backend (consistent hashing), only among tools/call servers.
                served = {await _whoami(client) for _ in range(6)}
                assert len(served) == 1 and served <= {"mcp-0", "mcp-1"}
                failed = await client.call_tool("fail", {})
                assert failed.is_error
            assert len(gw.bal.sessions) == 0
            # each stream is counted when its ext_proc stream closes, which may trail the client's return
            await wait_until(lambda: gw.active() == 0, what="no lease left")
            tool_backends = [gw.bal.pool.backends[a] for a in addrs[:2]]
            assert sum(b.completed for b in tool_backends) == 7
            assert (
                sum(b.failed.get("jsonrpc_error", 0) for b in tool_backends) == 1
            )  # seen in the buffered body


async def test_drained_backend_gets_no_new_streams_while_its_open_stream_finishes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    async with (
        emulators(SLOW, SLOW, SLOW) as addrs,
        gateway(addrs, workdir=tmp_path, admin_token_file=token) as gw,
        aiohttp.ClientSession() as http,
    ):
        first = await http.post(f"{gw.url}/v1/completions", json=completion_body(tokens=40))
        early = _served_by([(await first.content.readline()).decode()[5:].strip()])
        drained = addrs[int(early.rsplit("-", 1)[1])]
        async with http.post(
            f"{gw.admin_url}/admin/drain", json={"address": drained}, headers={"Authorization": "Bearer t"}
        ) as resp:
            assert resp.status == 200
        bodies = [completion_body(tokens=2) for _ in range(8)]
        answers = await asyncio.gather(*(_complete(http, f"{gw.url}/v1/completions", b) for b in bodies))
        assert early not in {_served_by(a) for a in answers}
        assert gw.active(drained) == 1  # the stream that was there keeps its lease
        rest = await read_sse(first)
        first.close()
        assert rest[-1] == "[DONE]"
        await wait_until(lambda: gw.active() == 0, what="drained backend emptied")
        signals = await (await http.get(f"{gw.admin_url}/signals")).json()
        states = {b["address"]: b["state"] for b in signals["backends"]}
        assert states[drained] == "draining"


async def test_dead_backend_is_retried_on_the_fallback_and_the_lease_follows(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{processes.free_port('127.0.0.1')}"  # nothing listens there
    async with (
        emulators(SLOW, SLOW) as addrs,
        gateway([dead, *addrs], workdir=tmp_path) as gw,
        aiohttp.ClientSession() as http,
    ):
        resp = await http.post(f"{gw.url}/v1/completions", json=completion_body(tokens=20))
        assert resp.status == 200
        served = _served_by([(await resp.content.readline()).decode()[5:].strip()])
        assert served in {"gpu-0", "gpu-1"}
        assert gw.bal.pool.backends[dead].failed == {"connect": 1}  # first in order, so it was the pick
        assert gw.active(dead) == 0 and gw.active() == 1  # the lease moved to the backend that serves
        assert (await read_sse(resp))[-1] == "[DONE]"
        resp.close()
        await wait_until(lambda: gw.active() == 0, what="lease released")


async def test_subset_hint_limits_the_choice(tmp_path: Path) -> None:
    async with (
        emulators(SLOW, SLOW, SLOW) as addrs,
        gateway(addrs, workdir=tmp_path, subset=[addrs[1]]) as gw,
        aiohttp.ClientSession() as http,
    ):
        bodies = [completion_body(tokens=2) for _ in range(5)]
        answers = await asyncio.gather(*(_complete(http, f"{gw.url}/v1/completions", b) for b in bodies))
        assert {_served_by(a) for a in answers} == {"gpu-1"}


async def test_subset_hint_naming_no_known_backend_gets_503(tmp_path: Path) -> None:
    async with (
        emulators(SLOW) as addrs,
        gateway(addrs, workdir=tmp_path, subset=["10.9.9.9:8000"]) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(f"{gw.url}/v1/completions", json=completion_body(tokens=2)) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "balancer_error"


async def test_picker_down_fails_open_to_least_request_over_the_pool(tmp_path: Path) -> None:
    async with (
        emulators(SLOW, SLOW) as addrs,
        gateway(addrs, workdir=tmp_path, picker_up=False, failure_mode_allow=True) as gw,
        aiohttp.ClientSession() as http,
    ):
        answers = await asyncio.gather(
            *(_complete(http, f"{gw.url}/v1/completions", completion_body(tokens=2)) for _ in range(4))
        )
        assert {_served_by(a) for a in answers} <= {"gpu-0", "gpu-1"}


async def test_picker_down_fails_closed_with_503_when_configured(tmp_path: Path) -> None:
    async with (
        emulators(SLOW) as addrs,
        gateway(addrs, workdir=tmp_path, picker_up=False, failure_mode_allow=False) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(f"{gw.url}/v1/completions", json=completion_body(tokens=2)) as resp:
            assert resp.status == 503


async def test_client_cannot_choose_its_backend_with_the_destination_header(tmp_path: Path) -> None:
    async with (
        emulators(SLOW, SLOW) as addrs,
        gateway(addrs, workdir=tmp_path, picker_up=False, failure_mode_allow=True) as gw,
        aiohttp.ClientSession() as http,
    ):
        headers = {"x-gateway-destination-endpoint": addrs[1]}
        answers = await asyncio.gather(
            *(
                _complete(http, f"{gw.url}/v1/completions", completion_body(tokens=40), headers=headers)
                for _ in range(12)
            )
        )
        # Had the header survived, all twelve would be on gpu-1; stripped, least request uses both.
        assert {_served_by(a) for a in answers} == {"gpu-0", "gpu-1"}


async def _complete(
    http: aiohttp.ClientSession, url: str, body: dict[str, object], headers: dict[str, str] | None = None
) -> list[str]:
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    return events


async def _whoami(client: Client) -> str:
    result = await client.call_tool("whoami", {})
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text
