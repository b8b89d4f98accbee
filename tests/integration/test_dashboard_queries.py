"""Every dashboard query is valid PromQL for a real Prometheus (Debian's, started here on loopback).

Prometheus parses the expression before it evaluates anything, so with an empty TSDB a query either
succeeds with an empty result or fails with HTTP 400 `bad_data` naming the parse error. That catches
typos, unbalanced braces, wrong function arity, and range/instant type errors (`rate()` of an instant
vector, `histogram_quantile` without `le`) in the JSON Grafana will load. Whether each query *returns
data* needs the balancer and controller being scraped: that half comes with the end-to-end test, which
can reuse `dashboards.generate.queries()` with `tests.fakes.prometheus.running_prometheus` as here.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from dashboards import generate
from tests.fakes import prometheus


def query(server: prometheus.PrometheusServer, expr: str) -> tuple[int, dict[str, Any]]:
    """GET /api/v1/query; the HTTP status and the decoded JSON body (error bodies included)."""
    params = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{server.url}/api/v1/query?{params}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[prometheus.PrometheusServer]:
    """A real Prometheus on 127.0.0.1 with an empty data directory and no scrape targets."""
    with prometheus.running_prometheus(tmp_path_factory.mktemp("prometheus")) as server:
        yield server


QUERIES = generate.queries()
QUERY_IDS = [f"{d}/{p}/{i}" for i, (d, p, _) in enumerate(QUERIES)]


@pytest.mark.parametrize(("dashboard", "panel", "expr"), QUERIES, ids=QUERY_IDS)
def test_dashboard_query_parses(
    prometheus_server: prometheus.PrometheusServer, dashboard: str, panel: str, expr: str
) -> None:
    status, body = query(prometheus_server, generate.substitute(expr))
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
def test_a_broken_query_is_rejected(prometheus_server: prometheus.PrometheusServer, broken: str) -> None:
    """The check above can fail: Prometheus answers 400 bad_data to what does not parse or type-check."""
    status, body = query(prometheus_server, broken)
    assert status == 400
    assert body["errorType"] == "bad_data"
