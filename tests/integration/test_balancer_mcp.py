"""The real `mcp` SDK client and servers through the balancer: sticky (sealed) sessions, also across two
replicas behind round robin, 404 for a vanished backend and 503 for an ejected one, stateless requests routed
by Mcp-Method and Mcp-Name, and tool errors in a client's own calls never counted against the backend."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web
from mcp import Client

from tests.fakes.balancer_env import balancer, start_app, write_backends
from tests.fakes.balancer_mcp import mcp_servers

SESSIONS = 12


async def _whoami(client: Client) -> str:
    result = await client.call_tool("whoami", {})
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text


async def test_many_legacy_sessions_stay_on_their_backend_and_spread_under_the_bound(tmp_path: Path) -> None:
    async with mcp_servers(3) as addrs, balancer(addrs, session_epsilon=0.25) as lb:
        ready = asyncio.Event()
        opened: list[int] = []
        answers: dict[int, list[str]] = {}

        async def session(i: int) -> None:
            async with Client(f"{lb.url}/mcp", mode="legacy") as client:
                answers[i] = [await _whoami(client)]
                opened.append(i)
                if len(opened) == SESSIONS:
                    ready.set()
                await ready.wait()  # all sessions open at once
                answers[i] += [await _whoami(client) for _ in range(3)]

        async with asyncio.TaskGroup() as group:
            for i in range(SESSIONS):
                group.create_task(session(i))
            await ready.wait()
            assert len(lb.bal.sessions) == SESSIONS
            per_backend = [lb.bal.pool.backends[a].sessions for a in addrs]
            assert sum(per_backend) == SESSIONS and max(per_backend) <= 5  # ceil(1.25 * 12 / 3)
        for calls in answers.values():
            assert len(calls) == 4 and len(set(calls)) == 1  # sticky
        assert len(Counter(calls[0] for calls in answers.values())) == 3
        assert len(lb.bal.sessions) == 0  # each client sent DELETE on exit
        assert lb.active() == 0


async def test_session_whose_backend_left_gets_404(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    path = tmp_path / "backends.json"
    async with mcp_servers(2) as addrs:
        write_backends(path, [{"address": a} for a in addrs])
        async with (
            balancer(backends_file=path, admin_token_file=token) as lb,
            aiohttp.ClientSession() as http,
        ):
            async with Client(f"{lb.url}/mcp", mode="legacy") as client:
                home = await _whoami(client)
                session_id = next(iter(lb.bal.sessions._sessions))
                gone = addrs[int(home.rsplit("-", 1)[1])]
                write_backends(path, [{"address": a} for a in addrs if a != gone])
                headers = {"Authorization": "Bearer t"}
                async with http.post(f"{lb.admin_url}/admin/reload", headers=headers) as resp:
                    assert resp.status == 200
                body = {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}
                async with http.post(
                    f"{lb.url}/mcp", json=body, headers={"Mcp-Session-Id": session_id}
                ) as resp:
                    assert resp.status == 404
                    assert "initialize a new session" in (await resp.json())["error"]["message"]
            # A new session lands on the remaining backend.
            async with Client(f"{lb.url}/mcp", mode="legacy") as client:
                assert await _whoami(client) != home


async def test_sessionless_requests_are_routed_by_mcp_method_and_tool_errors_count(tmp_path: Path) -> None:
    async with mcp_servers(3) as addrs:
        backends = [
            {"address": addrs[0], "methods": ["tools/call"]},
            {"address": addrs[1], "methods": ["server/discover", "tools/list"]},
            {"address": addrs[2], "methods": ["server/discover", "tools/list"]},
        ]
        path = tmp_path / "backends.json"
        write_backends(path, backends)
        async with balancer(backends_file=path) as lb:
            async with Client(f"{lb.url}/mcp") as client:
                assert {await _whoami(client) for _ in range(5)} == {"mcp-0"}
                failed = await client.call_tool("fail", {})
                assert failed.is_error
            assert len(lb.bal.sessions) == 0  # the modern protocol has no session to pin
            tool_backend = lb.bal.pool.backends[addrs[0]]
            assert tool_backend.completed == 6
            # A failing tool is the client's business: recorded, never counted towards ejection.
            assert tool_backend.failed == {"client_error": 1} and tool_backend.consecutive_failures == 0
            assert lb.bal.pool.backends[addrs[1]].completed + lb.bal.pool.backends[addrs[2]].completed >= 1


async def test_a_client_failing_its_own_tools_ejects_nobody_and_other_sessions_go_on() -> None:
    """H1: a client calling a failing tool five times in its own MCP session ejected the backend, and every
    other client's session on it was then deleted (404) for good."""
    async with (
        mcp_servers(1) as addrs,
        balancer(addrs, consecutive_failures=3, max_ejected_fraction=1.0) as lb,
    ):
        async with (
            Client(f"{lb.url}/mcp", mode="legacy") as bystander,
            Client(f"{lb.url}/mcp", mode="legacy") as c,
        ):
            assert await _whoami(bystander) == "mcp-0"
            for _ in range(5):
                assert (await c.call_tool("fail", {})).is_error
            backend = lb.bal.pool.backends[addrs[0]]
            assert backend.state(lb.bal.clock.monotonic()) == "ready" and backend.consecutive_failures == 0
            assert backend.failed == {"client_error": 5}
            assert await _whoami(bystander) == "mcp-0"  # the other session is untouched


async def test_sessions_on_an_ejected_backend_get_503_with_retry_after_and_are_kept() -> None:
    async with (
        mcp_servers(2) as addrs,
        balancer(addrs, base_ejection_s=30.0) as lb,
        aiohttp.ClientSession() as http,
    ):
        async with Client(f"{lb.url}/mcp", mode="legacy") as client:
            home = await _whoami(client)
            backend = lb.bal.pool.backends[addrs[int(home.rsplit("-", 1)[1])]]
            session_id = next(iter(lb.bal.sessions._sessions))
            backend.ejected_until_s = lb.bal.clock.monotonic() + 30.0
            body = {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}
            headers = {"Mcp-Session-Id": session_id, "Accept": "application/json, text/event-stream"}
            async with http.post(f"{lb.url}/mcp", json=body, headers=headers) as resp:
                assert resp.status == 503 and 25 <= int(resp.headers["Retry-After"]) <= 30
            assert len(lb.bal.sessions) == 1  # kept
            backend.ejected_until_s = None  # the ejection ends
            assert await _whoami(client) == home  # the same session carries on, on the same backend


async def _round_robin(targets: list[str]) -> tuple[web.AppRunner, str, Counter[str]]:
    """A tiny HTTP round-robin proxy (per request, streaming) in front of `targets`: a Service without affinity."""
    hits: Counter[str] = Counter()
    turn = itertools.count()
    hop = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        target = targets[next(turn) % len(targets)]
        hits[target] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with session.request(
            request.method, f"{target}{request.raw_path}", headers=headers, data=await request.read()
        ) as upstream:
            resp = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in hop},
            )
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(lambda _: session.close())
    runner, address = await start_app(app)
    return runner, f"http://{address}", hits


async def test_two_replicas_behind_round_robin_keep_legacy_sessions_and_route_stateless_tools_alike(
    tmp_path: Path,
) -> None:
    """M4: the manifests run 2+ replicas behind a Service without affinity, and a session that reached the other
    replica got 404. Sealed ids route on any replica; stateless calls hash by method and tool name."""
    key_file = tmp_path / "session-keys"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    async with (
        mcp_servers(3) as addrs,
        balancer(addrs, session_key_file=key_file) as one,
        balancer(addrs, session_key_file=key_file) as two,
    ):
        runner, url, hits = await _round_robin([one.url, two.url])
        try:
            async with Client(f"{url}/mcp") as client:  # the 2026-07-28 revision: stateless
                # Both replicas hash the same tool to the same backend (all are under the load bound).
                assert len({await _whoami(client) for _ in range(6)}) == 1
            assert len(one.bal.sessions) + len(two.bal.sessions) == 0  # no session to pin
            for _ in range(4):
                async with Client(f"{url}/mcp", mode="legacy") as client:
                    assert len({await _whoami(client) for _ in range(4)}) == 1  # sticky across replicas
            assert hits[one.url] >= 8 and hits[two.url] >= 8
        finally:
            await runner.cleanup()
