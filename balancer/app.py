"""Wiring: the proxy app, the admin app, their background tasks, and serving them on sockets.

`create_apps(config)` builds both aiohttp applications around one `runtime.Balancer`; `create_app(config)` is
the proxy app alone (the admin app hangs off it under `ADMIN_APP`), which the tests and the demo rely on. `serve()`
starts both listeners, each with its own TLS settings (tls_* for clients, admin_tls_* for the admin listener,
so turning on client TLS does not lock the controller and the probes out of /signals; mutual TLS when a
client CA is given), with aiohttp's handler cancellation on, so a client that disconnects while we wait on a
backend releases its lease at once. The client listener runs under listeners.GuardedRunner (connection caps,
header deadline, keep-alive timeout).

Admin listener, on its own port so it can stay off the public Service:
    GET  /signals  /metrics  /healthz  /readyz        (read-only, no token)
    POST /admin/drain    {"address": ...} or {"pod": ...}   (bearer token from admin_token_file)
    POST /admin/undrain  same body
    POST /admin/weights  {"address": ..., "weight": 2.0}
    POST /admin/reload   re-read the backends file now
Without a token file the POSTs answer 403: an unauthenticated drain endpoint is a denial-of-service endpoint.

Background tasks (static file reload, EndpointSlice watch, hotspot tracking, session expiry, backend metric
scrapes) live in the proxy app's `cleanup_ctx`, each guarded: a crash is logged and the task restarts after a
backoff, and shutdown cancels and awaits them all.

What this module does not do: relay (proxy.py) or parse flags (cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from balancer import config as config_mod
from balancer import (
    discovery,
    endpointslices,
    inferencepools,
    listeners,
    metrics,
    proxy,
    reporting,
    responses,
    scraping,
)
from balancer.errors import ConfigError
from balancer.runtime import Balancer
from contract import clock as clock_mod

log = logging.getLogger(__name__)

ADMIN_APP: Final = web.AppKey("admin_app", web.Application)
TRACKER: Final = web.AppKey("hotspot_tracker", reporting.HotspotTracker)
REGISTRY: Final = web.AppKey("registry", CollectorRegistry)
FILE_SOURCE: Final = web.AppKey("file_source", discovery.FileSource)

HOTSPOT_PERIOD_S = 1.0
"""Hotspot scores are refreshed this often between /signals requests (durations are tracked to this step)."""
IDLE_SWEEP_S = 1.0
"""Open streams are checked for idleness this often (or twice per idle limit when that is shorter)."""
RESTART_BACKOFF_S = (1.0, 30.0)
"""A crashed background task restarts after 1 s, doubling up to 30 s."""


def create_apps(
    config: config_mod.BalancerConfig,
    *,
    clock: clock_mod.Clock = clock_mod.SYSTEM,
    bal: Balancer | None = None,
) -> tuple[web.Application, web.Application]:
    """The proxy app and the admin app around one Balancer.

    Raises:
        ConfigError: the backends file is unreadable or invalid at startup.
    """
    bal = bal or Balancer(config, clock=clock)
    tracker = reporting.HotspotTracker(bal)
    registry = metrics.registry_for(bal, tracker)
    file_source = discovery.FileSource(bal, config.backends_file) if config.backends_file else None
    if file_source is not None:
        file_source.load(initial=True)

    app = web.Application(client_max_size=config.max_body_bytes)
    admin = web.Application()
    for target in (app, admin):
        target[proxy.BALANCER] = bal
        target[TRACKER] = tracker
        target[REGISTRY] = registry
        if file_source is not None:
            target[FILE_SOURCE] = file_source
    app[ADMIN_APP] = admin
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.cleanup_ctx.append(_lifecycle)

    admin.router.add_get("/signals", _signals)
    admin.router.add_get("/metrics", _metrics)
    admin.router.add_get("/healthz", _healthz)
    admin.router.add_get("/readyz", _readyz)
    for action in ("drain", "undrain", "weights", "reload"):
        admin.router.add_post(f"/admin/{action}", _admin)
    return app, admin


def create_app(
    config: config_mod.BalancerConfig, *, clock: clock_mod.Clock = clock_mod.SYSTEM
) -> web.Application:
    """The proxy app; its admin app is `app[ADMIN_APP]`."""
    app, _ = create_apps(config, clock=clock)
    return app


@dataclass
class Served:
    """Running listeners; `close()` stops them and the background tasks."""

    runners: list[web.AppRunner]
    port: int
    admin_port: int | None

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


async def serve(
    config: config_mod.BalancerConfig,
    *,
    clock: clock_mod.Clock = clock_mod.SYSTEM,
    apps: tuple[web.Application, web.Application] | None = None,
    shutdown_grace_s: float = 30.0,
) -> Served:
    """Start the proxy (and admin) listeners; port 0 in the config picks a free port (see `Served.port`).

    `shutdown_grace_s` is how long open streams may run on after `Served.close()` stops accepting.
    """
    app, admin = apps or create_apps(config, clock=clock)
    server_ssl = server_ssl_context(config)
    admin_ssl = admin_ssl_context(config)
    runners: list[web.AppRunner] = []
    try:
        runner = listeners.GuardedRunner(
            app, config=config, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_grace_s
        )
        await runner.setup()
        runners.append(runner)
        host, port = config_mod.parse_host_port(config.listen)
        site = web.TCPSite(runner, host, port, ssl_context=server_ssl, backlog=4096)
        await site.start()
        bound = _bound_port(runner)
        admin_port = None
        if config.admin_listen is not None:
            admin_runner = web.AppRunner(admin, access_log=None)
            await admin_runner.setup()
            runners.append(admin_runner)
            ahost, aport = config_mod.parse_host_port(config.admin_listen)
            await web.TCPSite(admin_runner, ahost, aport, ssl_context=admin_ssl).start()
            admin_port = _bound_port(admin_runner)
    except BaseException:
        for r in reversed(runners):
            await r.cleanup()
        raise
    return Served(runners=runners, port=bound, admin_port=admin_port)


def server_ssl_context(config: config_mod.BalancerConfig) -> ssl.SSLContext | None:
    """TLS for the client listener from the cert files; requires client certificates when a client CA is set."""
    return _ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca, prefix="tls")


def admin_ssl_context(config: config_mod.BalancerConfig) -> ssl.SSLContext | None:
    """TLS for the admin listener: its own settings (admin_tls_*), so client TLS leaves /signals readable."""
    return _ssl_context(
        config.admin_tls_cert, config.admin_tls_key, config.admin_tls_client_ca, prefix="admin_tls"
    )


def _ssl_context(
    cert: Path | None, key: Path | None, client_ca: Path | None, *, prefix: str
) -> ssl.SSLContext | None:
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            context.load_verify_locations(cafile=str(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files ({prefix}_cert={cert}, {prefix}_key={key}): {exc}") from exc
    return context


def _bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    bal = app[proxy.BALANCER]
    await bal.start()
    tracker = app[TRACKER]
    jobs: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("hotspots", lambda: _every(bal, HOTSPOT_PERIOD_S, tracker.update)),
        ("sessions", lambda: _every(bal, min(60.0, bal.config.session_idle_timeout_s), bal.sessions.expire)),
        (
            "idle-streams",
            lambda: _every(bal, min(IDLE_SWEEP_S, bal.config.idle_timeout_s / 2), bal.sweep_idle),
        ),
    ]
    if FILE_SOURCE in app:
        jobs.append(("backends-file", app[FILE_SOURCE].watch))
    for service in bal.config.kube_services:
        watcher = endpointslices.EndpointSliceWatch(bal, service)
        jobs.append((f"endpointslices {service}", watcher.run))
    for pool in bal.config.kube_inference_pools:
        jobs.append((f"inferencepool {pool}", inferencepools.InferencePoolWatch(bal, pool).run))
    if bal.config.scrape_metrics:
        jobs.append(("scrape", scraping.Scraper(bal).run))
    tasks = [asyncio.create_task(_guard(name, job, bal), name=name) for name, job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await bal.close()


async def _every(bal: Balancer, period_s: float, action: Callable[[], Any]) -> None:
    while True:
        await bal.clock.sleep(period_s)
        action()


async def _guard(name: str, job: Callable[[], Awaitable[None]], bal: Balancer) -> None:
    """Run a background job forever: log a crash and restart it after a growing backoff."""
    backoff_s = RESTART_BACKOFF_S[0]
    while True:
        try:
            await job()
            log.warning("background task %s returned; restarting", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s crashed; restarting in %.0fs", name, backoff_s)
        await bal.clock.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, RESTART_BACKOFF_S[1])


async def _signals(request: web.Request) -> web.Response:
    report = reporting.build_signals(request.app[proxy.BALANCER], request.app[TRACKER])
    return web.Response(text=report.model_dump_json(), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready when at least one backend can take a stream (so a Service sends traffic only to useful replicas)."""
    bal = request.app[proxy.BALANCER]
    now = bal.clock.monotonic()
    serving = [b.address for b in bal.pool.present() if b.state(now) in ("ready", "warming")]
    if not serving:
        return web.json_response({"status": "not ready", "reason": "no backend can take streams"}, status=503)
    return web.json_response({"status": "ready", "backends": len(serving)})


async def _admin(request: web.Request) -> web.Response:
    bal = request.app[proxy.BALANCER]
    denied = _check_token(request, bal)
    if denied is not None:
        return denied
    action = request.path.rsplit("/", 1)[-1]
    if action == "reload":
        if FILE_SOURCE not in request.app:
            return responses.error_response(409, "no backends file is configured (--backends-file)")
        try:
            request.app[FILE_SOURCE].load()
        except ConfigError as exc:
            return responses.error_response(400, str(exc))
        return web.json_response({"reloaded": True, "backends": len(bal.pool.present())})
    try:
        body = await request.json()
    except ValueError:
        return responses.error_response(
            400, 'the body must be a JSON object such as {"address": "10.0.0.7:8000"}'
        )
    if not isinstance(body, dict):
        return responses.error_response(400, "the body must be a JSON object")
    address, pod = body.get("address"), body.get("pod")
    matches = [b for b in bal.pool.present() if (address and b.address == address) or (pod and b.pod == pod)]
    if not matches:
        return responses.error_response(404, f"no backend with address={address!r} or pod={pod!r}")
    now = bal.clock.monotonic()
    if action == "weights":
        weight = body.get("weight")
        if (
            not isinstance(weight, int | float)
            or isinstance(weight, bool)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            return responses.error_response(400, f"weight must be a finite number > 0, got {weight!r}")
        for b in matches:
            b.weight = float(weight)
    else:
        for b in matches:
            bal.pool.set_draining(b, action == "drain", now_s=now)
    bal.pool.notify()
    return web.json_response({"action": action, "backends": [b.address for b in matches]})


def _check_token(request: web.Request, bal: Balancer) -> web.Response | None:
    path = bal.config.admin_token_file
    if path is None:
        return responses.error_response(403, "admin changes are disabled: start with --admin-token-file")
    try:
        token = path.read_text().strip()
    except OSError as exc:
        return responses.error_response(503, f"cannot read the admin token file: {exc.strerror}")
    given = request.headers.get("Authorization", "")
    if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return responses.error_response(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return None
