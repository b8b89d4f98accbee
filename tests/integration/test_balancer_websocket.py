"""WebSocket through the balancer: frames both ways, subprotocol, close codes kept, lease held until the end,
messages capped both ways, and the upgrade's headers cleaned like any HTTP request's."""

from __future__ import annotations

import aiohttp
from aiohttp import WSMsgType, web

from tests.fakes.balancer_env import balancer, start_app, wait_until


async def _echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=["chat.v2"])
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            if msg.data == "bye":
                await ws.close(code=4002, message=b"server says bye")
                break
            await ws.send_str(f"echo:{msg.data}:{request.headers.get('X-Forwarded-For')}")
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    return ws


async def _ws_backend() -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/v1/realtime", _echo)
    return await start_app(app)


async def test_frames_relay_both_ways_and_the_backend_close_code_reaches_the_client() -> None:
    runner, address = await _ws_backend()
    try:
        async with balancer([address]) as lb, aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{lb.url}/v1/realtime", protocols=["chat.v1", "chat.v2"]) as ws:
                assert ws.protocol == "chat.v2"  # the backend's choice
                assert lb.active(address) == 1
                await ws.send_str("hi")
                assert (await ws.receive_str()) == "echo:hi:127.0.0.1"
                await ws.send_bytes(b"\x01\x02\x03")
                assert (await ws.receive_bytes()) == b"\x03\x02\x01"
                await ws.send_str("bye")
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE and msg.data == 4002 and msg.extra == "server says bye"
            await wait_until(lambda: lb.active() == 0, what="lease released after close")
            assert lb.bal.pool.backends[address].completed == 1
    finally:
        await runner.cleanup()


async def test_client_close_code_reaches_the_backend() -> None:
    closed: list[int | None] = []

    async def record(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        closed.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", record)
    runner, address = await start_app(app)
    try:
        async with balancer([address]) as lb, aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{lb.url}/v1/realtime")
            await ws.close(code=4001, message=b"client done")
            await wait_until(lambda: closed != [] and lb.active() == 0, what="backend saw the close")
            assert closed == [4001]
    finally:
        await runner.cleanup()


async def test_websocket_to_a_refusing_backend_gets_502_before_the_upgrade() -> None:
    runner, address = await start_app(web.Application())
    await runner.cleanup()
    async with balancer([address]) as lb, aiohttp.ClientSession() as http:
        try:
            await http.ws_connect(f"{lb.url}/v1/realtime")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 502
        else:
            raise AssertionError("the upgrade should have been refused")
        assert lb.active() == 0


async def test_a_message_over_the_cap_closes_with_1009_and_blames_the_client() -> None:
    """H3: one 50 MiB message added 111 MB of RSS. Messages over ws_max_message_bytes are refused."""
    runner, address = await _ws_backend()
    try:
        async with balancer([address], ws_max_message_bytes=64 * 1024) as lb, aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{lb.url}/v1/realtime") as ws:
                await ws.send_str("small")
                assert (await ws.receive_str()).startswith("echo:small")
                await ws.send_bytes(b"x" * (1024 * 1024))
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            await wait_until(lambda: lb.active() == 0, what="lease released after the oversized message")
            backend = lb.bal.pool.backends[address]
            assert backend.failed == {"client_error": 1} and backend.consecutive_failures == 0
    finally:
        await runner.cleanup()


async def test_backend_message_over_the_cap_is_not_relayed() -> None:
    async def flood(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"y" * (1024 * 1024))
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", flood)
    runner, address = await start_app(app)
    try:
        async with balancer([address], ws_max_message_bytes=64 * 1024) as lb, aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{lb.url}/v1/realtime") as ws:
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
            await wait_until(lambda: lb.active() == 0, what="lease released")
            assert lb.bal.pool.backends[address].failed == {"message_too_big": 1}
    finally:
        await runner.cleanup()


async def test_upgrade_headers_get_the_http_hygiene() -> None:
    """Connection-named and hop-by-hop headers are dropped; X-Forwarded-* are rebuilt, not trusted."""
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.WebSocketResponse:
        seen.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", record)
    runner, address = await start_app(app)
    headers = {
        "Connection": "Upgrade, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Keep-Alive": "timeout=5",
        "Expect": "100-continue",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "gopher",
        "X-Kept": "yes",
    }
    try:
        async with balancer([address]) as lb, aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{lb.url}/v1/realtime", headers=headers) as ws:
                await ws.receive()
        got = {k.lower(): v for k, v in seen[0].items()}
        for dropped in ("x-secret-hop", "proxy-authorization", "keep-alive", "expect"):
            assert dropped not in got
        assert got["x-forwarded-proto"] == "http" and got["x-forwarded-host"] != "evil.example"
        assert got["x-kept"] == "yes"
    finally:
        await runner.cleanup()
