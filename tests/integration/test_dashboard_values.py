"""Every dashboard panel shows the right number: a real Prometheus backfilled with known series.

`test_dashboard_queries.py` proves each query parses; this proves each one computes what its panel
claims. The series are built so the answers are known by hand: constant gauges, counters growing at a
fixed rate, histograms whose observations all fall in one bucket (so `histogram_quantile` interpolates
to a known value). They include the edge cases that once showed up in `forestall demo` as -0.283
GPU-hours and a NaN reconcile time:

- a policy whose pods use more GPUs than the provisioner holds (idle would integrate negative);
- counters reset mid-range by a process restart (`increase` and `rate` must not count them back);
- a histogram with no observations in the rate window (`histogram_quantile` gives NaN from 0/0): a
  backend that served nothing recently, and the controller after reconciles stop.

Every target of every panel must have an expectation here, so a new panel needs one too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from dashboards import generate
from tests.fakes import prometheus

STEP_S = 15.0
"""Scrape interval of the backfilled series (the chart's default)."""

T = 1_699_999_200.0
"""Evaluation time: a whole hour, so 1-minute subquery points and 15 s samples line up with it."""

START, END = T - 2 * 3600, T + 600
"""Two hours of history before T, ten minutes after (the zero-rate checks look at END)."""

VALUES = {**generate.SUBSTITUTIONS, "$__rate_interval": "1m", "$__range": "59m30s"}
"""A 59m30s range holds exactly the 60 one-minute subquery points T-59m..T, and 238 scrape intervals."""

NS = {"namespace": "ns"}
P, Q = {**NS, "policy": "p"}, {**NS, "policy": "q"}
B1, B2 = {"backend": "10.0.0.1:8000"}, {"backend": "10.0.0.2:8000"}
IN_USE_DROP_S = T - 1830
"""Policy p uses 10 GPUs (more than the 8 provisioned) until T-30m30s, then 4."""

TIMES = np.arange(START, END + STEP_S / 2, STEP_S)


def gauge(
    name: str, labels: Mapping[str, str], value: float | Callable[[np.ndarray], np.ndarray]
) -> prometheus.Sample:
    values = value(TIMES) if callable(value) else np.full(TIMES.size, float(value))
    return prometheus.Sample(name, labels, TIMES, values)


def counter(
    name: str,
    labels: Mapping[str, str],
    rate: float,
    *,
    reset_at: float | None = None,
    stop_at: float | None = None,
    base: float = 0.0,
) -> prometheus.Sample:
    """A counter growing by `rate` per second; restarted from 0 at `reset_at`; flat after `stop_at`."""
    inc = np.full(TIMES.size, rate * STEP_S)
    if stop_at is not None:
        inc[TIMES > stop_at] = 0.0
    values = base + np.cumsum(inc)
    if reset_at is not None:
        k = int(np.searchsorted(TIMES, reset_at))
        values[k:] = np.cumsum(inc[k:])  # the restarted process counts from 0: the first step is `inc`
    return prometheus.Sample(name, labels, TIMES, values)


def histogram(
    name: str, labels: Mapping[str, str], bounds: tuple[float, ...], value_s: float, rate: float, **kw: float
) -> list[prometheus.Sample]:
    """Buckets, count and sum of a histogram observing `value_s` `rate` times per second."""
    out = [
        counter(f"{name}_bucket", {**labels, "le": repr(b)}, rate if value_s <= b else 0.0, **kw)
        for b in bounds
    ]
    out.append(counter(f"{name}_bucket", {**labels, "le": "+Inf"}, rate, **kw))
    out.append(counter(f"{name}_count", labels, rate, **kw))
    out.append(counter(f"{name}_sum", labels, rate * value_s, **kw))
    return out


def series() -> list[prometheus.Sample]:
    c = "forestall_controller_"
    b = "forestall_balancer_"
    out = [
        gauge(c + "observed_demand_streams", P, 40),
        gauge(c + "observed_demand_streams", Q, 10),
        gauge(c + "forecast_streams", {**P, "quantile": "0.95"}, 55),
        gauge(c + "forecast_streams", {**Q, "quantile": "0.95"}, 12),
        gauge(c + "horizon_seconds", P, 540),
        gauge(c + "horizon_seconds", Q, 600),
        gauge(c + "desired_replicas", P, 5),
        gauge(c + "desired_replicas", Q, 1),
        gauge(c + "current_replicas", P, 4),
        gauge(c + "current_replicas", Q, 1),
        gauge(c + "ready_replicas", P, 3),
        gauge(c + "ready_replicas", Q, 1),
        gauge(c + "pending_gpus", P, 2),
        gauge(c + "pending_gpus", Q, 0),
        gauge(c + "provisioned_gpus", P, 8),
        gauge(c + "provisioned_gpus", Q, 0),
        gauge(c + "gpus_in_use", P, lambda t: np.where(t < IN_USE_DROP_S, 10.0, 4.0)),
        gauge(c + "gpus_in_use", Q, 4),
        gauge(c + "lead_time_seconds", {**P, "stage": "node_provisioning"}, 300),
        gauge(c + "lead_time_seconds", {**P, "stage": "pod_start"}, 60),
        gauge(c + "lead_time_seconds", {**P, "stage": "model_load"}, 120),
        gauge(c + "demand_data_available", P, 1),
        gauge(c + "demand_data_available", Q, 0),
        counter(c + "decisions_total", {**P, "reason": "forecast_up"}, 1 / 15, reset_at=T - 1200),
        counter(c + "decisions_total", {**Q, "reason": "scale_down"}, 1 / 60),
        counter(c + "drains_total", P, 1 / 60),
        counter(c + "reconcile_errors_total", P, 0.1),
        counter(c + "reconcile_errors_total", Q, 0.0, base=3.0),
        *histogram(
            c + "reconcile_duration_seconds",
            {},
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            0.003,
            1 / 15,
            stop_at=T + 60,
        ),
        gauge(b + "active_streams", B1, 6),
        gauge(b + "active_streams", B2, 4),
        gauge(b + "queued_streams", B1, 1),
        gauge(b + "queued_streams", B2, 0),
        gauge(b + "open_sessions", B1, 2),
        gauge(b + "open_sessions", B2, 3),
        counter(b + "streams_started_total", B1, 2.0),
        counter(b + "streams_started_total", B2, 1.0),
        counter(b + "streams_completed_total", B1, 1.0),
        counter(b + "streams_completed_total", B2, 1.0, reset_at=T - 30),
        counter(b + "streams_failed_total", {**B1, "reason": "reset"}, 0.5),
        *histogram(b + "ttfb_seconds", B1, (0.1, 0.5, 1.0), 0.2, 1.0),
        *histogram(b + "ttfb_seconds", B2, (0.1, 0.5, 1.0), 0.05, 0.0, base=5.0),
        gauge(b + "backend_state", {**B1, "state": "ready"}, 1),
        gauge(b + "backend_state", {**B1, "state": "draining"}, 0),
        gauge(b + "backend_state", {**B2, "state": "ready"}, 0),
        gauge(b + "backend_state", {**B2, "state": "draining"}, 1),
        gauge(b + "hotspot_score", B1, 1.2),
        gauge(b + "hotspot_score", B2, 0.8),
        gauge(b + "admission_queue_length", {}, 3),
        counter(b + "rejected_streams_total", {}, 0.25),
        counter(b + "relayed_bytes_total", B1, 64.0),
        counter(b + "relayed_bytes_total", B2, 32.0),
    ]
    return out


NSP, NSQ = "namespace=ns,policy=p", "namespace=ns,policy=q"
BK1, BK2 = "backend=10.0.0.1:8000", "backend=10.0.0.2:8000"

EXPECTED: dict[tuple[str, int], dict[str, float]] = {
    ("Demand and forecast peak", 0): {NSP: 40, NSQ: 10},
    ("Demand and forecast peak", 1): {NSP + ",quantile=0.95": 55, NSQ + ",quantile=0.95": 12},
    ("Replicas: desired, current, ready", 0): {NSP: 5, NSQ: 1},
    ("Replicas: desired, current, ready", 1): {NSP: 4, NSQ: 1},
    ("Replicas: desired, current, ready", 2): {NSP: 3, NSQ: 1},
    ("GPUs: pending, provisioned, in use", 0): {"policy=p": 2, "policy=q": 0},
    ("GPUs: pending, provisioned, in use", 1): {"policy=p": 8, "policy=q": 0},
    ("GPUs: pending, provisioned, in use", 2): {"policy=p": 4, "policy=q": 4},
    ("Measured lead time by stage vs horizon", 0): {
        "policy=p,stage=node_provisioning": 300,
        "policy=p,stage=pod_start": 60,
        "policy=p,stage=model_load": 120,
    },
    ("Measured lead time by stage vs horizon", 1): {"policy=p": 540, "policy=q": 600},
    ("Demand data available", 0): {NSP: 1, NSQ: 0},
    ("Active streams per backend", 0): {BK1: 6, BK2: 4},
    ("Queued streams and sessions per backend", 0): {BK1: 1, BK2: 0},
    ("Queued streams and sessions per backend", 1): {BK1: 2, BK2: 3},
    ("Stream starts and completions per second", 0): {BK1: 2, BK2: 1},
    # b2's completions counter restarted 30 s before T: the rate over the minute is still 1 per second.
    ("Stream starts and completions per second", 1): {"": 2},
    ("Failed streams per second by reason", 0): {BK1 + ",reason=reset": 0.5},
    ("Hotspot score per backend", 0): {BK1: 1.2, BK2: 0.8},
    # Every stream's first byte at 0.2 s, in the (0.1, 0.5] bucket: linear interpolation inside it.
    ("Time to first byte", 0): {"": 0.1 + 0.4 * 0.5},
    ("Time to first byte", 1): {"": 0.1 + 0.4 * 0.99},
    # b2 started no stream in the window: no value for it (not NaN).
    ("Time to first byte", 2): {BK1: 0.1 + 0.4 * 0.99},
    ("Backends by state", 0): {"state=ready": 1, "state=draining": 1},
    ("Streams left on draining backends", 0): {BK2: 4},
    ("Admission queue", 0): {"": 3},
    ("Rejected streams per second", 0): {"": 0.25},
    ("Relayed bytes per second", 0): {BK1: 64, BK2: 32},
    # One decision per scrape for p (a restart 20 min before T included), one a minute for q.
    ("Decisions by reason", 0): {"reason=forecast_up": 4, "reason=scale_down": 1},
    ("Drains started", 0): {NSP: 1},
    ("Replicas desired vs ready", 0): {"policy=p": 5, "policy=q": 1},
    ("Replicas desired vs ready", 1): {"policy=p": 3, "policy=q": 1},
    ("Decisions over the range", 0): {NSP + ",reason=forecast_up": 238, NSQ + ",reason=scale_down": 59.5},
    # 60 one-minute points: p holds 8 GPUs; uses 10 for 29 of them, then 4 for 31. Idle counts the
    # 29 minutes above the provisioned 8 as 0, not as -2 each; q (nothing provisioned, 4 in use) idles 0.
    ("GPU-hours over the range", 0): {"policy=p": 8, "policy=q": 0},
    ("GPU-hours over the range", 1): {"policy=p": (29 * 10 + 31 * 4) / 60, "policy=q": 4},
    ("GPU-hours over the range", 2): {"policy=p": 31 * 4 / 60, "policy=q": 0},
    ("GPUs provisioned (GPU-hours per hour)", 0): {"policy=p": 8, "policy=q": 0},
    # Every reconcile took 3 ms, in the (2.5 ms, 5 ms] bucket.
    ("Reconcile duration", 0): {"": 0.0025 + 0.0025 * 0.5},
    ("Reconcile duration", 1): {"": 0.0025 + 0.0025 * 0.99},
    ("Reconcile errors per second", 0): {NSP: 0.1, NSQ: 0},
}

QUERIES = generate.queries()


def _targets() -> list[tuple[str, int, str]]:
    """(panel title, target index in the panel, PromQL) for every query of every dashboard."""
    out, seen = [], dict[tuple[str, str], int]()
    for dashboard, panel, expr in QUERIES:
        index = seen.get((dashboard, panel), 0)
        seen[(dashboard, panel)] = index + 1
        out.append((panel, index, expr))
    return out


TARGETS = _targets()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[prometheus.PrometheusServer]:
    with prometheus.running_prometheus(tmp_path_factory.mktemp("prom"), series=series()) as s:
        yield s


def values_at(server: prometheus.PrometheusServer, expr: str, at_s: float) -> dict[str, float]:
    """The query's result as {"label=value,...": number} (labels sorted, metric name left out)."""
    out = {}
    for r in server.query(generate.substitute(expr, VALUES), at_s=at_s):
        key = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k != "__name__")
        out[key] = float(r["value"][1])
    return out


def test_every_panel_target_has_an_expectation() -> None:
    assert {(panel, index) for panel, index, _ in TARGETS} == set(EXPECTED)


@pytest.mark.parametrize(("panel", "index", "expr"), TARGETS, ids=[f"{p}/{i}" for p, i, _ in TARGETS])
def test_panel_value(server: prometheus.PrometheusServer, panel: str, index: int, expr: str) -> None:
    got = values_at(server, expr, T)
    want = EXPECTED[(panel, index)]
    assert set(got) == set(want), f"{panel}[{index}]: series {sorted(got)}, expected {sorted(want)}"
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), f"{panel}[{index}] {key}: {got[key]}"


@pytest.mark.parametrize(("panel", "index", "expr"), TARGETS, ids=[f"{p}/{i}" for p, i, _ in TARGETS])
def test_no_panel_is_ever_nan_or_negative(
    server: prometheus.PrometheusServer, panel: str, index: int, expr: str
) -> None:
    """Over the whole recording (every 5 minutes), reconciles stopping at T+1m included."""
    for at_s in np.arange(START + 3600, END + 1, 300.0):
        for key, value in values_at(server, expr, float(at_s)).items():
            assert not math.isnan(value) and value >= 0, (
                f"{panel}[{index}] {key} at T{at_s - T:+.0f}s: {value}"
            )


def test_reconcile_duration_shows_no_data_once_reconciles_stop(server: prometheus.PrometheusServer) -> None:
    """Ten minutes after the last reconcile the rate is 0: no value, where the old query gave NaN."""
    exprs = [e for p, _, e in TARGETS if p == "Reconcile duration"]
    assert exprs and all(values_at(server, e, END) == {} for e in exprs)
    unguarded = exprs[0].split(" and on ")[0]
    assert all(math.isnan(v) for v in values_at(server, unguarded, END).values())
    assert values_at(server, unguarded, END)


def test_idle_gpu_hours_would_be_negative_without_the_clamp(server: prometheus.PrometheusServer) -> None:
    """The idle panel's old query, on the same data: q's pods on capacity nobody provisioned gave -4."""
    old = (
        "sum by (policy) (sum_over_time((forestall_controller_provisioned_gpus "
        "- forestall_controller_gpus_in_use)[59m30s:1m])) / 60"
    )
    assert values_at(server, old, T)["policy=q"] == pytest.approx(-4.0)


def test_the_openmetrics_file_is_what_promtool_got(tmp_path: Path) -> None:
    """Values survive the text format exactly (the expectations above depend on it)."""
    prometheus.write_openmetrics(tmp_path / "x.om", [counter("c_total", {}, 64.0)])
    last = (tmp_path / "x.om").read_text().splitlines()[-2]
    assert float(last.split()[1]) == 64.0 * STEP_S * TIMES.size
