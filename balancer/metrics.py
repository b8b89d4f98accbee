"""Prometheus metrics of the balancer, read from the live state at scrape time.

One custom collector turns the pool's plain counters and gauges into the metric names fixed in
notes/contracts.md (dashboards depend on them), so a stream costs integer additions, not metric-object calls,
and the figures can never disagree with `/signals`. The only label is `backend` (its address) plus `reason` on
failures and `state` on the state gauge, all small fixed sets.

Each app gets its own `CollectorRegistry`, so tests (and several balancers in one process) never share metrics.

What this module does not do: compute hotspots (reporting.py) or serve HTTP (app.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from balancer.backends import TTFB_BUCKETS_S
from balancer.reporting import HotspotTracker
from balancer.runtime import Balancer

STATES = ("warming", "ready", "draining", "ejected")
P = "forestall_balancer_"


class BalancerCollector(Collector):
    """Yields every `forestall_balancer_*` metric from the balancer's state."""

    def __init__(self, bal: Balancer, tracker: HotspotTracker) -> None:
        self.bal = bal
        self.tracker = tracker

    def collect(self) -> Iterable[Metric]:
        bal = self.bal
        now = bal.clock.monotonic()
        backends = list(bal.pool.backends.values())
        hot = self.tracker.update()
        lb = ["backend"]
        active = GaugeMetricFamily(
            P + "active_streams", "Streams relayed now, counted from pick to last byte.", labels=lb
        )
        queued = GaugeMetricFamily(
            P + "queued_streams", "Streams the backend reports waiting (scraped).", labels=lb
        )
        sessions = GaugeMetricFamily(P + "open_sessions", "MCP sessions pinned to the backend.", labels=lb)
        started = CounterMetricFamily(P + "streams_started", "Streams placed on the backend.", labels=lb)
        completed = CounterMetricFamily(P + "streams_completed", "Streams relayed to their end.", labels=lb)
        failed = CounterMetricFamily(
            P + "streams_failed", "Stream failures by reason.", labels=["backend", "reason"]
        )
        ttfb = HistogramMetricFamily(
            P + "ttfb_seconds", "Time from request to first response byte.", labels=lb
        )
        state = GaugeMetricFamily(
            P + "backend_state", "1 for the backend's current state.", labels=["backend", "state"]
        )
        score = GaugeMetricFamily(P + "hotspot_score", "Load over the weighted mean load.", labels=lb)
        relayed = CounterMetricFamily(P + "relayed_bytes", "Response body bytes relayed.", labels=lb)
        for b in backends:
            key = [b.address]
            active.add_metric(key, b.active)
            queued.add_metric(key, b.queued)
            sessions.add_metric(key, b.sessions)
            started.add_metric(key, b.started)
            completed.add_metric(key, b.completed)
            for reason, count in sorted(b.failed.items()):
                failed.add_metric([b.address, reason], count)
            cumulative, buckets = 0, []
            for bound, count in zip((*TTFB_BUCKETS_S, float("inf")), b.ttfb_buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            ttfb.add_metric(key, buckets, b.ttfb_sum_s)
            current = b.state(now)
            for s in STATES:
                state.add_metric([b.address, s], 1.0 if s == current else 0.0)
            spot = hot.get(b.address)
            score.add_metric(key, spot.score if spot else 0.0)
            relayed.add_metric(key, b.relayed_bytes)
        queue = GaugeMetricFamily(P + "admission_queue_length", "Streams waiting for capacity.")
        queue.add_metric([], len(bal.admission))
        rejected = CounterMetricFamily(
            P + "rejected_streams", "Streams answered 503 (queue full or wait over)."
        )
        rejected.add_metric([], bal.admission.rejected_total)
        yield from (
            active,
            queued,
            sessions,
            started,
            completed,
            failed,
            ttfb,
            state,
            score,
            queue,
            rejected,
            relayed,
        )


def registry_for(bal: Balancer, tracker: HotspotTracker) -> CollectorRegistry:
    """A fresh registry holding only this balancer's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(bal, tracker))
    return registry
