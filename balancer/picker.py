"""Wiring of the gateway endpoint picker: one Balancer, the ext_proc gRPC server, and the balancer's admin app.

The picker is a balancer replica without a data plane: the same `runtime.Balancer`, the same background tasks
(discovery from a backends file, EndpointSlices or InferencePools; hotspot tracking; session expiry; backend
metric scrapes) and the same admin listener (`/signals`, `/metrics`, `/healthz`, `/readyz`, the authenticated drain
and weight POSTs), built by `app.create_apps` exactly as for `forestall balancer`. So the controller couples to a
picker as it couples to a balancer, and cannot tell them apart. The proxy app is set up without a listener: its
`cleanup_ctx` is where those background tasks live, and nothing may be relayed through it here.

What this module does not do: the protocol (extproc.py) or flags (picker_cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from balancer import app as app_mod
from balancer import config as config_mod
from balancer import extproc
from balancer.runtime import Balancer
from contract import clock as clock_mod


@dataclass
class PickerServed:
    """A running picker: `port` is the ext_proc (gRPC) port, `admin_port` the admin HTTP port."""

    bal: Balancer
    grpc: extproc.GrpcServed
    runners: list[web.AppRunner]
    port: int
    admin_port: int | None

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop taking streams, let open ones end for `grace_s`, then stop the admin app and background tasks."""
        await self.grpc.close(grace_s)
        for runner in reversed(self.runners):
            await runner.cleanup()


async def serve(
    config: config_mod.BalancerConfig,
    *,
    clock: clock_mod.Clock = clock_mod.SYSTEM,
    fallbacks: int = extproc.FALLBACKS,
) -> PickerServed:
    """Start the picker: ext_proc on `config.listen`, the admin app on `config.admin_listen`.

    Raises:
        ConfigError: the backends file is unreadable or invalid at startup.
    """
    bal = Balancer(config, clock=clock)
    app, admin = app_mod.create_apps(config, clock=clock, bal=bal)
    runners: list[web.AppRunner] = []
    try:
        tasks = web.AppRunner(app, access_log=None)
        await tasks.setup()  # runs the background tasks; no site: nothing is relayed by this process
        runners.append(tasks)
        admin_port = None
        if config.admin_listen is not None:
            admin_runner = web.AppRunner(admin, access_log=None)
            await admin_runner.setup()
            runners.append(admin_runner)
            host, port = config_mod.parse_host_port(config.admin_listen)
            await web.TCPSite(
                admin_runner, host, port, ssl_context=app_mod.server_ssl_context(config)
            ).start()
            admin_port = int(admin_runner.addresses[0][1])
        served = await extproc.serve_grpc(bal, config.listen, fallbacks=fallbacks)
    except BaseException:
        for runner in reversed(runners):
            await runner.cleanup()
        raise
    return PickerServed(bal=bal, grpc=served, runners=runners, port=served.port, admin_port=admin_port)
