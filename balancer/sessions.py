"""Affinity: MCP sessions sealed to their backend, stateless MCP and generic affinity by consistent hashing.

Legacy MCP sessions (Streamable HTTP with `Mcp-Session-Id`). The backend that answers `initialize` names the
session in an `Mcp-Session-Id` response header. The id the client sees instead is a seal (AES-GCM, key from a
Secret every replica reads, `session_key_file`) of the backend's address and the backend's own id; any
replica opens it, routes to that address, and restores the backend's id on the way in. So sessions stay on
their backend whichever replica a request reaches, with no shared table: the shipped manifests run two or
more replicas behind a plain Service, and a per-replica table answered 404 to half of a session's requests.
A seal that does not open (forged, another key, truncated) is an unknown session: 404, which the MCP spec
defines as "start a new one". A backend that left discovery: 404 as well (a silent move would reach a server
that never heard of the session). A backend that is ejected: 503 with Retry-After, and the session is kept,
since ejection is temporary and the backend still holds the session's state.

`SessionTable` only counts sessions as load (bounded-load placement and the signals' oldest-session age) on
the replica that saw them; because routing never depends on it, it is bounded by evicting the oldest entries,
per client address (`max_sessions_per_client`) and overall (`max_sessions`). `DELETE` or a backend 404 on the
MCP path ends an entry; an idle one is forgotten after `session_idle_timeout_s`. A session whose requests
reach several replicas is counted on each, and ended only on the one its DELETE reaches; the others forget it
when it idles out (each replica's count is its own view of load, as its streams are).

New sessions use bounded loads (Mirrokni et al., "Consistent Hashing with Bounded Loads"): a backend takes a new
session only while its load (streams + sessions, per unit of weight) is under (1 + epsilon) x the weighted
mean, so long-lived sessions cannot pile onto one pod; among those under the bound the least loaded wins.

Stateless MCP (the 2026-07-28 revision: no initialize, no session id; each request names itself with
`Mcp-Method` and `Mcp-Name`) and generic affinity (`affinity_header` / `affinity_cookie`) hash a key onto a ring
(virtual nodes in proportion to weight) and walk from there to the first eligible backend under the same bound:
the same tool keeps landing on the same few backends (warm caches, loaded tool state) while they are not
overloaded, and keys move minimally when backends come and go. Only backends whose `methods` list the
request's `Mcp-Method` (or list nothing) are candidates.

What this module does not do: relay (proxy.py) or decide backend states (health.py, warmup.py).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from balancer.backends import Backend, Pool
from balancer.errors import ConfigError
from contract import clock as clock_mod

log = logging.getLogger(__name__)

VNODES_PER_WEIGHT = 64
"""Ring points per unit of weight: enough for an even spread over a handful of backends, cheap to rebuild."""

SESSION_HEADER = "Mcp-Session-Id"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"

SEAL_VERSION = b"\x01"
"""First byte of a sealed id, so the format can change without misreading old ids."""
SEAL_AAD = b"forestall mcp session v1"
"""Associated data: a seal made for something else with the same key does not open as a session."""
NONCE_BYTES = 12
KEY_BYTES = 32
MAX_SEALED_CHARS = 2048
"""Longer ids are not opened (bounds the work a forged header can cause)."""


class SessionSeal:
    """Seals (backend address, backend session id) into the id clients see, and opens it again.

    Args:
        keys: AES-256 keys; the first seals, every one opens (so a new key can be rolled out before use).
    """

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys
        self._aeads = [AESGCM(key) for key in keys]

    @classmethod
    def from_file(cls, path: Path | None) -> SessionSeal:
        """Keys from `path` (one base64 key of 32 bytes per line), or one random key when `path` is None.

        Raises:
            ConfigError: unreadable file, no key, or a line that is not base64 of 32 bytes.
        """
        if path is None:
            log.warning(
                "no session_key_file: MCP session ids are sealed with a random key, so only this replica "
                "can route them; give every replica the same key file (a Secret) to run several"
            )
            return cls([AESGCM.generate_key(bit_length=256)])
        try:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ConfigError(f"cannot read session_key_file {path}: {exc.strerror or exc}") from exc
        keys = []
        for number, line in enumerate(lines, 1):
            try:
                key = base64.b64decode(line, validate=True)
            except binascii.Error:
                key = b""
            if len(key) != KEY_BYTES:
                raise ConfigError(
                    f"session_key_file {path} line {number}: expected base64 of {KEY_BYTES} random bytes "
                    "(make one with `head -c 32 /dev/urandom | base64`)"
                )
            keys.append(key)
        if not keys:
            raise ConfigError(f"session_key_file {path} holds no key; put base64 of {KEY_BYTES} bytes in it")
        return cls(keys)

    def seal(self, address: str, backend_session_id: str) -> str:
        """The session id the client sees (visible ASCII, as MCP requires)."""
        nonce = os.urandom(NONCE_BYTES)
        plain = address.encode() + b"\n" + backend_session_id.encode()
        sealed = SEAL_VERSION + nonce + self._aeads[0].encrypt(nonce, plain, SEAL_AAD)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def open(self, session_id: str) -> tuple[str, str] | None:
        """(backend address, backend session id), or None when the id is not one of ours."""
        if len(session_id) > MAX_SEALED_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(session_id + "=" * (-len(session_id) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < 1 + NONCE_BYTES + 16 or raw[:1] != SEAL_VERSION:
            return None
        nonce, body = raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :]
        for aead in self._aeads:
            try:
                plain = aead.decrypt(nonce, body, SEAL_AAD)
            except InvalidTag:
                continue
            address, sep, backend_id = plain.decode().partition("\n")
            return (address, backend_id) if sep else None
        return None


@dataclass
class Session:
    backend: Backend
    client: str
    created_s: float
    used_s: float


class SessionTable:
    """Sealed session id -> backend, counting each session as load on its backend (this replica's view).

    Eviction (per-client and total bounds, idle expiry) only stops counting a session; it stays routable.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        idle_timeout_s: float,
        clock: clock_mod.Clock,
        max_per_client: int = 256,
        max_total: int = 100_000,
    ) -> None:
        self.pool = pool
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.max_per_client = max_per_client
        self.max_total = max_total
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        """Least recently used first."""
        self._per_client: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def bind(self, session_id: str, backend: Backend, *, client: str = "") -> None:
        """Count `session_id` on `backend` (learned from its response, or seen in a request)."""
        now = self.clock.monotonic()
        old = self._sessions.get(session_id)
        if old is not None and old.backend is backend:
            old.used_s = now
            self._sessions.move_to_end(session_id)
            return
        if old is not None:
            self.end(session_id)
        self._sessions[session_id] = Session(backend, client, now, now)
        backend.sessions += 1
        mine = self._per_client.setdefault(client, OrderedDict())
        mine[session_id] = None
        while len(mine) > self.max_per_client:
            self.end(next(iter(mine)))
        while len(self._sessions) > self.max_total:
            self.end(next(iter(self._sessions)))

    def lookup(self, session_id: str) -> Backend | None:
        """The backend of a session this replica bound itself (unsealed ids: the gateway endpoint picker,
        one replica, sees Envoy's traffic and cannot rewrite the id); None (-> 404) if unknown or its backend
        is gone. The proxy routes sealed ids instead (`runtime.Balancer.open_session`)."""
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
        self._sessions.move_to_end(session_id)
        return backend

    def end(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        session.backend.sessions -= 1
        mine = self._per_client.get(session.client)
        if mine is not None:
            mine.pop(session_id, None)
            if not mine:
                del self._per_client[session.client]

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

    def counted(self, client: str) -> int:
        """Sessions counted for one client address."""
        return len(self._per_client.get(client, ()))


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
