"""WebSocket through the balancer: frames both ways, subprotocol, close codes kept, lease held until the end."""

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
    app.router.add_get("/ws", _echo)
    return await start_app(app)


async def test_frames_relay_both_ways_and_the_backend_close_code_reaches_the_client() -> None:
    runner, address = await _ws_backend()
    try:
        async with balancer([address]) as lb, aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{lb.url}/ws", protocols=["chat.v1", "chat.v2"]) as ws:
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
    app.router.add_get("/ws", record)
    runner, address = await start_app(app)
    try:
        async with balancer([address]) as lb, aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{lb.url}/ws")
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
            await http.ws_connect(f"{lb.url}/ws")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 502
        else:
            raise AssertionError("the upgrade should have been refused")
        assert lb.active() == 0
