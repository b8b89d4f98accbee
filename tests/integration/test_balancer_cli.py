"""`forestall balancer` as a process: serves streams from a backends file, reports on the admin port, stops
cleanly on SIGTERM; an invalid configuration exits 2 naming the field."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp

from tests.fakes.balancer_env import completion_body, emulators, read_sse, write_backends


async def test_cli_serves_streams_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with emulators({"slots": 2, "ttft_s": 0.0, "seconds_per_token": 0.0}) as addrs:
        path = tmp_path / "backends.yaml"
        write_backends(path, [{"address": addrs[0], "weight": 1.5}])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forestall.cli", "balancer",
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--backends-file", str(path),
            "--set", "idle_timeout_s=120",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(60):
                while True:
                    line = (await proc.stderr.readline()).decode()
                    assert line, "the balancer exited before listening"
                    found = re.search(r"listening on port (\d+), admin on port (\d+)", line)
                    if found:
                        port, admin = found.groups()
                        break
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"http://127.0.0.1:{port}/v1/completions", json=completion_body()
                ) as resp:
                    assert (await read_sse(resp))[-1] == "[DONE]"
                async with http.get(f"http://127.0.0.1:{admin}/signals") as resp:
                    report = await resp.json()
                assert report["backends"][0]["capacity_weight"] == 1.5
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    assert resp.status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                code = await proc.wait()
        assert code == 0


async def test_cli_invalid_configuration_exits_2_naming_the_field(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forestall.cli", "balancer",
        "--backends-file", str(tmp_path / "b.yaml"), "--set", "connect_timeout_s=-3",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "connect_timeout_s: Input should be greater than 0 (got -3)" in err.decode()
