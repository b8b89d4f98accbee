"""What the balancer reports: hotspot detection and the `/signals` document for the controller.

Hotspot. A backend's load is (active streams + reported queue + sessions) per unit of capacity weight; its
score is that load over the weighted mean load of the backends that can serve (not ejected). A backend whose
score stays above `hotspot_factor` for `hotspot_for_s` is a hotspot, reported with its score and a reason the
operator can act on: sticky sessions piling up (affinity is holding load there), a slow backend (its time to
first byte is well above the others', so it serves streams longer), or plain load. The controller uses it to
add capacity or drain-and-replace the pod; the balancer itself already steers new streams away.

The tracker is updated by a background loop on the injected clock and on every `/signals` request, so tests
drive it with `FakeClock.advance()`.

What this module does not do: serve HTTP (app.py) or define the schema (signals.py, shared with the controller).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

from balancer.backends import Backend
from balancer.runtime import Balancer
from contract import signals

SLOW_TTFB_RATIO = 2.0
"""A hot backend whose TTFB is this many times the median is reported as slow rather than merely busy."""


@dataclass(frozen=True)
class Hotspot:
    score: float
    hot: bool
    reason: str


class HotspotTracker:
    """Per-backend hotspot scores with the time each has been above the factor."""

    def __init__(self, bal: Balancer) -> None:
        self.bal = bal
        self._above_since: dict[str, float] = {}
        self.current: dict[str, Hotspot] = {}

    def update(self) -> dict[str, Hotspot]:
        """Recompute scores now; returns (and keeps) the result per backend address."""
        bal = self.bal
        bal.warmup.refresh()
        now = bal.clock.monotonic()
        serving = [b for b in bal.pool.backends.values() if b.present and b.state(now) != "ejected"]
        total = sum(_units(b) for b in serving)
        weight = sum(b.weight for b in serving)
        mean = total / weight if weight else 0.0
        ttfbs = [b.ttfb_ewma_s for b in serving if b.ttfb_samples]
        median_ttfb = statistics.median(ttfbs) if ttfbs else 0.0
        factor = bal.config.hotspot_factor
        result: dict[str, Hotspot] = {}
        for backend in bal.pool.backends.values():
            score = (_units(backend) / backend.weight) / mean if mean > 0 else 0.0
            if score > factor and backend in serving:
                since = self._above_since.setdefault(backend.address, now)
            else:
                self._above_since.pop(backend.address, None)
                since = None
            hot = since is not None and now - since >= bal.config.hotspot_for_s
            reason = _reason(backend, score, now - since, median_ttfb) if hot and since is not None else ""
            result[backend.address] = Hotspot(score=round(score, 3), hot=hot, reason=reason)
        for address in set(self._above_since) - set(result):
            del self._above_since[address]
        self.current = result
        return result


def build_signals(bal: Balancer, tracker: HotspotTracker) -> signals.Signals:
    """This replica's report in the shared schema."""
    hot = tracker.update()
    now = bal.clock.monotonic()
    backends = []
    for b in bal.pool.backends.values():
        state = b.state(now)
        spot = hot.get(b.address, Hotspot(0.0, False, ""))
        oldest = None
        if state == "draining":
            ages = [now - lease.started_s for lease in b.leases]
            session_age = bal.sessions.oldest_s(b)
            if session_age is not None:
                ages.append(session_age)
            oldest = max(ages) if ages else None
        backends.append(
            signals.BackendSignals(
                address=b.address,
                pod=b.pod,
                state=state,
                active_streams=b.active,
                queued_streams=b.queued,
                open_sessions=b.sessions,
                capacity_weight=b.weight,
                ttfb_s=b.ttfb_ewma_s if b.ttfb_samples else None,
                hotspot_score=spot.score,
                hotspot=spot.hot,
                hotspot_reason=spot.reason,
                draining_oldest_s=max(oldest, 0.0) if oldest is not None else None,
            )
        )
    return signals.Signals(
        replica=replica_name(bal),
        time=bal.clock.now(),
        backends=backends,
        admission_queue=len(bal.admission),
        rejected_streams_total=bal.admission.rejected_total,
    )


def replica_name(bal: Balancer) -> str:
    return bal.config.replica or os.environ.get("HOSTNAME") or bal.config.listen


def _units(backend: Backend) -> float:
    return float(backend.active + backend.queued + backend.sessions)


def _reason(backend: Backend, score: float, for_s: float, median_ttfb_s: float) -> str:
    units = int(_units(backend))
    if backend.sessions * 2 > units:
        return f"sticky sessions: {backend.sessions} of {units} load units are session-bound ({score:.1f}x mean for {for_s:.0f}s)"
    if median_ttfb_s > 0 and backend.ttfb_samples and backend.ttfb_ewma_s > SLOW_TTFB_RATIO * median_ttfb_s:
        return (
            f"slow backend: time to first byte {backend.ttfb_ewma_s:.2f}s vs median {median_ttfb_s:.2f}s "
            f"({score:.1f}x mean load for {for_s:.0f}s)"
        )
    return f"load {score:.1f}x the weighted mean for {for_s:.0f}s ({backend.active} streams, {backend.queued} queued)"
