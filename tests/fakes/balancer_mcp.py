"""Real MCP servers (the `mcp` SDK's MCPServer, Streamable HTTP, served by uvicorn) on loopback ports.

Each server has a `whoami` tool answering its own name, so a test can tell which backend served a call, and a
`fail` tool that raises (the SDK answers a 200 whose result has `isError: true`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import uvicorn
from mcp.server.mcpserver import MCPServer


def _server(name: str) -> MCPServer:
    server = MCPServer(name, log_level="WARNING")

    @server.tool()
    def whoami() -> str:
        """The name of the backend that served this call."""
        return name

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise RuntimeError("tool failed on purpose")

    return server


@contextlib.asynccontextmanager
async def mcp_servers(count: int) -> AsyncIterator[list[str]]:
    """`count` MCP servers named mcp-0.. on free loopback ports; yields their `host:port` addresses."""
    logging.getLogger("mcp").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    addresses = []
    try:
        for i in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            addresses.append(f"127.0.0.1:{sock.getsockname()[1]}")
            app = _server(f"mcp-{i}").streamable_http_app()
            config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
            server = uvicorn.Server(config)
            servers.append((server, asyncio.create_task(server.serve(sockets=[sock]))))
        for server, task in servers:
            while not server.started:
                if task.done():
                    await task
                await asyncio.sleep(0.01)
        yield addresses
    finally:
        for server, _ in servers:
            server.should_exit = True
        for _, task in servers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
