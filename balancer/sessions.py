"""Affinity: MCP sessions pinned to their backend, and generic header/cookie affinity by consistent hashing.

MCP Streamable HTTP. The backend that answers `initialize` names the session in an `Mcp-Session-Id` response
header; we remember which backend that was, and every later request carrying the id goes there. If that
backend is gone (left discovery, or ejected as dead), the request gets 404, which the MCP spec defines as
"session expired, start a new one": a silent move to another backend would reach a server that has never heard
of the session. `DELETE` ends it; an idle session is forgotten after `session_idle_timeout_s`.

New sessions use bounded loads (Mirrokni et al., "Consistent Hashing with Bounded Loads"): a backend takes a new
session only while its load (streams + sessions, per unit of weight) is under (1 + epsilon) x the weighted
mean, so long-lived sessions cannot pile onto one pod; among those under the bound the least loaded wins.

Generic affinity (`affinity_header` / `affinity_cookie`) hashes the value onto a ring (virtual nodes in
proportion to weight) and walks from there to the first eligible backend under the same bound: the same key
keeps its backend while that backend is not overloaded, and moves minimally when backends come and go.

Sessionless MCP requests carrying `Mcp-Method` are routed by that header without parsing the body: only
backends whose `methods` list it (or list nothing) are candidates.

What this module does not do: relay (proxy.py) or decide backend states (health.py, drain.py). The session
table lives in one balancer replica: with several replicas, run them with client-IP or header affinity in
front, or a session learned by one replica is unknown (404) to another.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

from balancer.backends import Backend, Pool
from contract import clock as clock_mod

VNODES_PER_WEIGHT = 64
"""Ring points per unit of weight: enough for an even spread over a handful of backends, cheap to rebuild."""

SESSION_HEADER = "Mcp-Session-Id"
METHOD_HEADER = "Mcp-Method"


@dataclass
class Session:
    backend: Backend
    created_s: float
    used_s: float


class SessionTable:
    """Mcp-Session-Id -> backend, counting each session as load on its backend."""

    def __init__(self, pool: Pool, *, idle_timeout_s: float, clock: clock_mod.Clock) -> None:
        self.pool = pool
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def bind(self, session_id: str, backend: Backend) -> None:
        """Remember that `backend` owns `session_id` (learned from its response)."""
        now = self.clock.monotonic()
        old = self._sessions.get(session_id)
        if old is not None:
            if old.backend is backend:
                old.used_s = now
                return
            old.backend.sessions -= 1
        self._sessions[session_id] = Session(backend, now, now)
        backend.sessions += 1

    def lookup(self, session_id: str) -> Backend | None:
        """The session's backend if it can still serve it; None (-> 404) if unknown or its backend is gone."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        backend = session.backend
        now = self.clock.monotonic()
        if (
            self.pool.backends.get(backend.address) is not backend
            or not backend.present
            or backend.state(now) == "ejected"
        ):
            self.end(session_id)
            return None
        session.used_s = now
        return backend

    def end(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.backend.sessions -= 1

    def expire(self) -> int:
        """Forget sessions idle longer than the timeout; returns how many."""
        cutoff = self.clock.monotonic() - self.idle_timeout_s
        stale = [sid for sid, s in self._sessions.items() if s.used_s < cutoff]
        for sid in stale:
            self.end(sid)
        return len(stale)

    def oldest_s(self, backend: Backend) -> float | None:
        """Age of the oldest session on `backend`, or None."""
        created = [s.created_s for s in self._sessions.values() if s.backend is backend]
        return self.clock.monotonic() - min(created) if created else None


def load_of(backend: Backend) -> float:
    """Load per unit of weight counted for affinity bounds: open streams plus pinned sessions."""
    return (backend.active + backend.sessions) / backend.weight


def under_bound(backends: list[Backend], *, epsilon: float) -> list[Backend]:
    """The backends whose load is below (1 + epsilon) x the weighted mean after one more placement."""
    if not backends:
        return []
    total = sum(b.active + b.sessions for b in backends) + 1
    weight = sum(b.weight for b in backends)
    bound = (1 + epsilon) * total / weight
    fits = [
        b
        for b in backends
        if (b.active + b.sessions + 1) / b.weight <= math.ceil(bound * b.weight) / b.weight
    ]
    return fits or backends


class HashRing:
    """Consistent hashing with bounded loads over the eligible backends."""

    def __init__(self) -> None:
        self._key: tuple[tuple[str, float], ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def choose(self, key: str, backends: Iterable[Backend], *, epsilon: float) -> Backend | None:
        """The first backend clockwise from `key`'s hash that is under the load bound."""
        eligible = {b.address: b for b in backends}
        if not eligible:
            return None
        self._rebuild(eligible.values())
        fits = {b.address for b in under_bound(list(eligible.values()), epsilon=epsilon)}
        start = bisect.bisect(self._points, _hash(key))
        n = len(self._points)
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner in fits:
                return eligible[owner]
        return None

    def _rebuild(self, backends: Iterable[Backend]) -> None:
        key = tuple(sorted((b.address, b.weight) for b in backends))
        if key == self._key:
            return
        points = []
        for address, weight in key:
            for i in range(max(1, round(VNODES_PER_WEIGHT * weight))):
                points.append((_hash(f"{address}#{i}"), address))
        points.sort()
        self._key = key
        self._points = [p for p, _ in points]
        self._owners = [a for _, a in points]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
