"""The controller's HTTP endpoints on its metrics port: `/metrics`, `/healthz` and `/readyz`.

- `/healthz` (liveness): 200 while the process can still do its job without a restart: the leader elector
  is running and turning (its last turn is recent) and every watch thread is alive. A dead elector or a dead
  informer thread answers 503 with the reason, so the kubelet restarts the pod. An unreachable API server is
  *not* a liveness failure: restarting cannot fix it, and the elector and informers retry on their own.
- `/readyz` (readiness): 200 once every watch cache has filled, until shutdown begins. A follower replica is
  ready too: readiness gates the metrics Service, not who acts.
- `/metrics`: the Prometheus registry, as `prometheus_client`'s own server would serve it.

The checks are callables returning the list of problems (empty = healthy), so the loop owns what healthy
means and this module only serves it.

What this module does not do: run the checks' subjects, or decide anything.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Check = Callable[[], list[str]]


def app(*, registry: CollectorRegistry, live: Check, ready: Check) -> web.Application:
    """The aiohttp application serving the three endpoints."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def probe(check: Check) -> Callable[[web.Request], object]:
        async def handler(_: web.Request) -> web.Response:
            problems = check()
            if problems:
                return web.Response(status=503, text="\n".join(problems) + "\n")
            return web.Response(text="ok\n")

        return handler

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/healthz", probe(live))  # type: ignore[arg-type]
    application.router.add_get("/readyz", probe(ready))  # type: ignore[arg-type]
    return application


async def serve(application: web.Application, *, host: str, port: int) -> web.AppRunner:
    """Start serving; the caller calls `cleanup()` on the returned runner at shutdown."""
    runner = web.AppRunner(application, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
