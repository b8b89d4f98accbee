"""Demand history from a real Prometheus: recorded demand backfilled with promtool, read by
`controller.demand.prometheus.PrometheusHistory` through prometheus-api-client, extended incrementally, and Prometheus
going away mid-run (the history goes stale and `decide()` holds capacity)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from contract.clock import SYSTEM
from controller import cluster, decide, forecasting, policy
from controller.demand import prometheus
from emulation import processes
from tests.fakes import specs
from tests.fakes.prometheus import (
    PrometheusServer,
    Sample,
    per_backend,
    recorded_demand,
    running_prometheus,
)

QUERY = 'sum(forestall_balancer_active_streams{namespace="llm"})'
HOURS = 30


@dataclasses.dataclass(frozen=True)
class Recorded:
    timestamps: np.ndarray
    values: np.ndarray

    def at(self, ts: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.timestamps, ts)
        assert np.all(self.timestamps[idx] == ts)
        return self.values[idx]

    @property
    def hour(self) -> float:
        """The last whole hour of the recording: step grids of 10 s and 60 s both land on it."""
        return float(self.timestamps[-1] // 3600 * 3600)


def _recorded() -> Recorded:
    # Invocations per 10 s of the Azure 2024 conversation trace, read as concurrent streams.
    return Recorded(*recorded_demand(HOURS))


def _samples(rec: Recorded) -> list[Sample]:
    """The demand split over two backends, as the balancer's per-backend gauge would report it."""
    return per_backend(rec.timestamps, rec.values, labels={"namespace": "llm"})


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    return _recorded()


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory, recorded: Recorded) -> Iterator[PrometheusServer]:
    with running_prometheus(tmp_path_factory.mktemp("prom"), series=_samples(recorded)) as server:
        yield server


def test_first_read_returns_the_recorded_history(prom: PrometheusServer, recorded: Recorded) -> None:
    reader = prometheus.PrometheusHistory(prom.url, QUERY, step_s=60.0, history_s=6 * 3600)
    now = recorded.hour - 3600 + 5
    reading = reader.read(now)
    assert reading.error is None and reading.history is not None
    h = reading.history
    assert h.timestamps.size == 360 and reading.queried_points == 360
    assert h.timestamps[-1] == now - 5 and np.all(np.diff(h.timestamps) == 60)
    np.testing.assert_array_equal(h.values, recorded.at(h.timestamps))
    assert h.fetched_s == now


def test_later_reads_query_only_the_new_tail(prom: PrometheusServer, recorded: Recorded) -> None:
    reader = prometheus.PrometheusHistory(prom.url, QUERY, step_s=60.0, history_s=6 * 3600)
    now = recorded.hour - 7200 + 5
    reader.read(now)
    before = len(prom.queries())
    for k in range(1, 6):
        reading = reader.read(now + 60 * k)
        assert reading.error is None and reading.history is not None
        assert reading.queried_points == prometheus.REFETCH_STEPS + 2
    logged = prom.queries()[before:]
    assert len(logged) == 5
    for k, q in enumerate(logged, start=1):
        end = now - 5 + 60 * k
        assert q["query"] == QUERY and q["step"] == 60
        assert _unix(q["start"]) == end - 60 * (prometheus.REFETCH_STEPS + 1) and _unix(q["end"]) == end
    h = reading.history
    assert h is not None and h.timestamps.size == 360  # the window slides, it does not grow
    fresh = prometheus.PrometheusHistory(prom.url, QUERY, step_s=60.0, history_s=6 * 3600).read(now + 300)
    assert fresh.history is not None
    np.testing.assert_array_equal(h.timestamps, fresh.history.timestamps)
    np.testing.assert_array_equal(h.values, fresh.history.values)


def test_a_long_first_read_is_split_under_the_points_limit(
    prom: PrometheusServer, recorded: Recorded
) -> None:
    reader = prometheus.PrometheusHistory(prom.url, QUERY, step_s=10.0, history_s=29 * 3600)
    before = len(prom.queries())
    reading = reader.read(recorded.hour)
    assert reading.error is None and reading.history is not None
    assert reading.queried_points == 29 * 360
    assert len(prom.queries()) - before == 2  # 10,440 points: two range queries
    np.testing.assert_array_equal(reading.history.values, recorded.at(reading.history.timestamps))


def test_a_query_returning_many_series_is_refused_clearly(prom: PrometheusServer, recorded: Recorded) -> None:
    reader = prometheus.PrometheusHistory(
        prom.url, "forestall_balancer_active_streams", step_s=60.0, history_s=3600
    )
    reading = reader.read(recorded.hour)
    assert reading.history is None
    assert reading.error is not None
    assert "returned 2 series" in reading.error and "wrap it in sum(...)" in reading.error


def test_invalid_promql_names_prometheus_error(prom: PrometheusServer, recorded: Recorded) -> None:
    reading = prometheus.PrometheusHistory(prom.url, "sum(", step_s=60.0, history_s=3600).read(recorded.hour)
    assert reading.history is None and reading.error is not None
    assert "query failed" in reading.error and "400" in reading.error


def _spec() -> policy.ScalingPolicySpec:
    return specs.spec(
        demand={"prometheus": {"url": "http://unused", "query": QUERY}, "staleAfterSeconds": 60},
        streams_per_replica=64,
        min_replicas=1,
        max_replicas=40,
        forecast={"stepSeconds": 60, "historySeconds": 86400, "model": "seasonalNaive"},
    )


def test_prometheus_going_away_holds_capacity_until_it_is_back(tmp_path: Path, recorded: Recorded) -> None:
    spec = _spec()
    port = processes.free_port()
    now = recorded.hour - 3 * 3600 + 5
    forecasts = forecasting.PolicyForecast(spec.forecast)
    pods = tuple(cluster.PodState(name=f"w{i}", phase="ready", created_s=now - 7200) for i in range(40))
    state = cluster.ClusterState(spec_replicas=40, pods=pods)  # far more than demand needs: fresh data drains

    def plan_at(t: float, history: decide.DemandHistory | None) -> decide.Plan:
        assert history is not None
        peak = forecasts.peak(
            history.timestamps, history.values, now=t, horizon_s=decide.horizon_s(spec, state)
        )
        return decide.decide(spec, t, history=history, forecast=peak, signals=None, state=state)

    with running_prometheus(tmp_path / "a", series=_samples(recorded), port=port) as server:
        reader = prometheus.PrometheusHistory(server.url, QUERY, step_s=60.0, history_s=86400)
        first = reader.read(now)
        assert first.error is None
        plan = plan_at(now, first.history)
        assert plan.demand_data_available and plan.drain and plan.forecast is not None
        server.stop()  # Prometheus goes away mid-run

        gone = reader.read(now + 30)
        assert gone.error is not None and "unreachable" in gone.error and server.url in gone.error
        assert gone.history is not None and gone.history.fetched_s == now  # the cache, as last read
        plan = plan_at(now + 30, gone.history)  # within staleAfterSeconds: still usable
        assert plan.demand_data_available

        later = reader.read(now + 90)
        plan = plan_at(now + 90, later.history)
        assert not plan.demand_data_available
        assert plan.reasons[0].code == "HistoryStale" and "last read 90 s ago" in plan.reasons[0].message
        assert plan.desired_replicas == 40 and not plan.drain and not plan.remove

    # Back on the same port and data: the next read fills the gap and the plan may act again.
    with running_prometheus(tmp_path / "b", series=_samples(recorded), port=port):
        back = reader.read(now + 600)
        assert back.error is None and back.history is not None and back.history.fetched_s == now + 600
        assert back.queried_points == 10 + prometheus.REFETCH_STEPS + 1
        np.testing.assert_array_equal(back.history.values, recorded.at(back.history.timestamps))
        assert plan_at(now + 600, back.history).demand_data_available


async def test_history_of_a_live_scraped_exporter(tmp_path: Path) -> None:
    """Prometheus scrapes a loopback exporter the test controls; the reader sees what it served."""
    level = {"value": 7}

    async def metrics(_: web.Request) -> web.Response:
        text = (
            "# TYPE forestall_balancer_active_streams gauge\n"
            f'forestall_balancer_active_streams{{namespace="llm",backend="a"}} {level["value"]}\n'
        )
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        scrape = [{"job_name": "balancer", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]
        with running_prometheus(tmp_path, scrape_configs=scrape, scrape_interval_s=1.0) as server:
            reader = prometheus.PrometheusHistory(server.url, QUERY, step_s=1.0, history_s=120)
            seen = await _until(reader, lambda v: v == 7)
            level["value"] = 12
            seen = await _until(reader, lambda v: v == 12)
            assert seen.history is not None and np.nanmax(seen.history.values) == 12
    finally:
        await runner.cleanup()


async def _until(
    reader: prometheus.PrometheusHistory, ok: object, limit_s: float = 30.0
) -> prometheus.HistoryReading:
    """Read until the newest sample satisfies `ok` (Prometheus scrapes once a second) or give up."""
    deadline = SYSTEM.monotonic() + limit_s
    while True:
        reading = await asyncio.to_thread(reader.read, SYSTEM.now())
        h = reading.history
        if h is not None and h.values.size and np.isfinite(h.values[-1]) and ok(h.values[-1]):  # type: ignore[operator]
            return reading
        assert SYSTEM.monotonic() < deadline, f"exporter value never seen: {reading}"
        await asyncio.sleep(0.2)


def _unix(value: object) -> float:
    """Query-log times are RFC 3339 strings."""
    import datetime as dt

    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
