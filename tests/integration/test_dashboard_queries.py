"""Every dashboard query is valid PromQL for a real Prometheus (Debian's, started here on loopback).

Prometheus parses the expression before it evaluates anything, so with an empty TSDB a query either
succeeds with an empty result or fails with HTTP 400 `bad_data` naming the parse error. That catches
typos, unbalanced braces, wrong function arity, and range/instant type errors (`rate()` of an instant
vector, `histogram_quantile` without `le`) in the JSON Grafana will load. Whether each query *returns
data* needs the balancer and controller being scraped: that half comes with the end-to-end test, which
can reuse `dashboards.generate.queries()` and `prometheus_server` below.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dashboards import generate

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
STARTUP_TIMEOUT_S = 30.0
"""Generous for a cold start on a loaded 2-core CI machine; an empty TSDB is normally ready in ~1 s."""


@dataclass(frozen=True)
class Prometheus:
    url: str

    def query(self, expr: str) -> tuple[int, dict[str, Any]]:
        """GET /api/v1/query; returns the HTTP status and the decoded JSON body (errors included)."""
        params = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus on 127.0.0.1 with an empty data directory and no scrape targets."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`, see scripts/setup)")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        _wait_ready(proc, url, log_path)
        yield Prometheus(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Poll /-/ready under a deadline (a readiness wait, not a timing assumption)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"prometheus not ready after {STARTUP_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)


QUERIES = generate.queries()
QUERY_IDS = [f"{d}/{p}/{i}" for i, (d, p, _) in enumerate(QUERIES)]


@pytest.mark.parametrize(("dashboard", "panel", "expr"), QUERIES, ids=QUERY_IDS)
def test_dashboard_query_parses(prometheus_server: Prometheus, dashboard: str, panel: str, expr: str) -> None:
    status, body = prometheus_server.query(generate.substitute(expr))
    assert status == 200, f"{dashboard} / {panel}: HTTP {status}: {body.get('error')}"
    assert body["status"] == "success"


@pytest.mark.parametrize(
    "broken",
    [
        'sum by (backend) (forestall_balancer_active_streams{backend=~".*"}',  # unbalanced parenthesis
        "rate(forestall_balancer_streams_started_total)",  # rate() of an instant vector
        "histogram_quantile(forestall_balancer_ttfb_seconds_bucket)",  # wrong arity
    ],
)
def test_a_broken_query_is_rejected(prometheus_server: Prometheus, broken: str) -> None:
    """The check above can fail: Prometheus answers 400 bad_data to what does not parse or type-check."""
    status, body = prometheus_server.query(broken)
    assert status == 400
    assert body["errorType"] == "bad_data"
