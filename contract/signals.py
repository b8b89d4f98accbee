"""The signals schema: what one balancer replica reports to the controller at `GET /signals`.

The balancer serves it; the controller reads it from every replica it finds through the balancer Service and
sums the figures per backend pod. It is versioned (`schema_version`) so that a controller can refuse a report
it does not understand instead of misreading it; additive changes keep the version, anything else bumps it.

Field names are snake_case on the wire too: this is our own JSON API, not a Kubernetes object.

What this module does not do: collect the figures (the balancer's app does) or add them up across replicas
(the controller does, with `merge`).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Final[Literal[1]] = 1
"""Bumped on any change a reader of the previous version would misread."""

BackendState = Literal["warming", "ready", "draining", "ejected"]
"""`warming`: slow start after joining. `draining`: no new streams, existing ones finish. `ejected`: taken out
after consecutive failures, back after the ejection time."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class BackendSignals(_Model):
    """One backend (one GPU worker pod) as this balancer replica sees it."""

    address: str = Field(min_length=1)
    """`host:port` the balancer sends streams to."""

    pod: str | None = None
    """Pod name when discovered through EndpointSlices; None for static backends."""

    state: BackendState
    active_streams: int = Field(ge=0)
    """Streams relayed now, counted from pick to last byte."""

    queued_streams: int = Field(0, ge=0)
    """Streams the backend itself reports waiting (vLLM `num_requests_waiting`), when scraped."""

    open_sessions: int = Field(0, ge=0)
    """MCP sessions pinned to this backend."""

    capacity_weight: float = Field(1.0, gt=0)
    """Relative capacity (streams it can carry versus a weight-1 backend)."""

    ttfb_s: float | None = Field(None, ge=0)
    """Peak-EWMA time to first byte, seconds; None before the first stream."""

    hotspot_score: float = Field(0.0, ge=0)
    """Load over the weighted mean load of all backends; > 1 is hotter than average."""

    hotspot: bool = False
    """True when the score stayed above the configured factor for the configured time."""

    hotspot_reason: str = ""
    """Why it is hot, e.g. `sticky sessions: 40 of 52 streams are session-bound`."""

    draining_oldest_s: float | None = Field(None, ge=0)
    """Age of the oldest stream or session left on a draining backend."""


class Signals(_Model):
    """One balancer replica's report."""

    schema_version: Literal[1] = SCHEMA_VERSION
    replica: str = Field(min_length=1)
    """Identity of the reporting replica (its pod name, or host:port)."""

    time: float = Field(ge=0)
    """Unix time of the report, seconds; the controller treats old reports as stale."""

    backends: list[BackendSignals] = Field(default_factory=list)
    admission_queue: int = Field(0, ge=0)
    """Streams waiting in the admission queue because every backend is at capacity."""

    rejected_streams_total: int = Field(0, ge=0)
    """Streams answered 503 since start (admission queue full or wait exceeded)."""

    @property
    def active_streams(self) -> int:
        """Streams on all backends of this replica."""
        return sum(backend.active_streams for backend in self.backends)


def merge(reports: list[Signals]) -> dict[str, BackendSignals]:
    """Sum reports from several balancer replicas per backend address.

    Streams, queues and sessions add up; the state is the most restrictive any replica reports (a backend
    draining on one replica is draining); the TTFB and hotspot score take the worst.
    """
    order = {"ready": 0, "warming": 1, "draining": 2, "ejected": 3}
    merged: dict[str, BackendSignals] = {}
    for report in reports:
        for backend in report.backends:
            seen = merged.get(backend.address)
            if seen is None:
                merged[backend.address] = backend
                continue
            merged[backend.address] = seen.model_copy(
                update={
                    "state": max(seen.state, backend.state, key=order.__getitem__),
                    "active_streams": seen.active_streams + backend.active_streams,
                    "queued_streams": max(seen.queued_streams, backend.queued_streams),
                    "open_sessions": seen.open_sessions + backend.open_sessions,
                    "ttfb_s": _max_opt(seen.ttfb_s, backend.ttfb_s),
                    "hotspot_score": max(seen.hotspot_score, backend.hotspot_score),
                    "hotspot": seen.hotspot or backend.hotspot,
                    "hotspot_reason": seen.hotspot_reason or backend.hotspot_reason,
                    "draining_oldest_s": _max_opt(seen.draining_oldest_s, backend.draining_oldest_s),
                    "pod": seen.pod or backend.pod,
                }
            )
    return merged


def _max_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
