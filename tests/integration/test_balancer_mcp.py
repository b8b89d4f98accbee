"""The real `mcp` SDK client and servers through the balancer: sticky sessions, 404 for a vanished backend,
sessionless requests routed by Mcp-Method, and tool errors in 200s counted as failures."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
from mcp import Client

from tests.fakes.balancer_env import balancer, write_backends
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
