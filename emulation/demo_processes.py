"""The processes `forestall demo` starts beside its workers: the balancer, Prometheus, the controller's /metrics.

Every child runs in its own session (Ctrl-C reaches it only through the demo, which stops it with
`emulation.processes.stop_process`) and logs into the demo's work directory.

What this module does not do: start the workers (`emulation.local.LocalCluster`) or decide anything.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

from controller import metrics
from emulation import processes

HOST = "127.0.0.1"


DISCOVERY_LAG_S = 1.0
"""Virtual seconds the demo's balancer may take to see a pod join or leave: about what an EndpointSlice watch
takes in a cluster. The backends file is polled every `DISCOVERY_LAG_S / time_scale` wall seconds; at its
default (1 wall s) a Ready pod waited up to 8 virtual seconds at 8x before it took streams, while the
simulator, like a cluster, uses it at once."""


def start_balancer(
    listen: int, admin: int, backends_file: Path, workdir: Path, *, time_scale: float = 1.0
) -> subprocess.Popen[bytes]:
    """The real balancer on loopback, reading the local cluster's backends file."""
    with open(workdir / "balancer.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return _popen(
            [
                sys.executable,
                "-m",
                "forestall.cli",
                "balancer",
                "--listen",
                f"{HOST}:{listen}",
                "--admin-listen",
                f"{HOST}:{admin}",
                "--backends-file",
                str(backends_file),
                "--set",
                f"reload_interval_s={DISCOVERY_LAG_S / time_scale:g}",
            ],
            log,
        )


def start_prometheus(port: int, targets: list[int], workdir: Path) -> subprocess.Popen[bytes]:
    """Prometheus scraping the balancer's admin port and the demo controller's metrics every second."""
    config = workdir / "prometheus.yml"
    listed = ", ".join(f"'{HOST}:{t}'" for t in targets)
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: forestall\n    honor_labels: true\n    static_configs: [{{targets: [{listed}]}}]\n"
    )
    with open(workdir / "prometheus.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return _popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={HOST}:{port}",
            ],
            log,
        )


async def print_dashboard_values(url: str, console: Console) -> None:
    """Print the current value of every dashboard query that has data (the balancer's, in the demo)."""
    try:
        from dashboards import generate  # the dashboards package lives beside the three in a source checkout
    except ImportError:
        console.print("[dim]dashboards package not found: skipping the dashboard queries[/]")
        return
    table = Table(title="dashboard queries now (Prometheus on loopback)")
    for column in ("dashboard", "panel", "value"):
        table.add_column(column)
    async with aiohttp.ClientSession() as http:
        # A few minutes of data: rates over 30 s, ranges over the demo so far.
        values = {**generate.SUBSTITUTIONS, "$__rate_interval": "30s", "$__range": "5m"}
        for dashboard, panel, expr in generate.queries():
            query = generate.substitute(expr, values)
            try:
                async with http.get(f"{url}/api/v1/query", params={"query": query}) as resp:
                    data = await resp.json()
            except (aiohttp.ClientError, ValueError):
                continue
            result = data.get("data", {}).get("result", [])
            if result:
                value = ", ".join(f"{float(r['value'][1]):.3g}" for r in result[:4])
                table.add_row(dashboard, panel, value)
    console.print(table)


async def serve_metrics(registry: metrics.ControllerMetrics, port: int) -> web.AppRunner:
    """The demo controller's /metrics on a loopback port, served from this event loop."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    async def handler(request: web.Request) -> web.Response:
        body = generate_latest(registry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner


def _popen(argv: list[str], log: Any) -> subprocess.Popen[bytes]:
    """A child in its own session (so Ctrl-C reaches it only through us), output to `log`."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


async def wait_port(port: int, *, attempts: int = 200) -> None:
    for _ in range(attempts):
        if processes.listening(HOST, port):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port}: the balancer did not start (see its log)")
