"""The backend table and stream leases: who is there, in what state, and how many streams each carries now.

A stream's load is a `Lease`, taken when the stream is placed and released in `finally` when it ends however
it ends (finished, client gone, backend gone, cancelled), so "least loaded" means fewest open streams, not
fewest open requests: a balancer that counts a stream only until its headers arrive piles new streams onto
pods that are still decoding. Releasing twice is harmless, but each attempt (proxy.py) releases exactly once.

Backends come from sources (the static file, each EndpointSlice watch, inline config); `sync()` replaces one
source's set. A backend that leaves its source stops getting new streams at once but keeps its object while
leases are open, so its in-flight streams finish and are counted (a terminating pod is drained, not cut); when
the last lease ends it is forgotten. A backend that joins after startup warms up (warmup.py ramps its weight).

The counters here (`started`, `completed`, `failed`, `relayed_bytes`, the TTFB histogram) are plain ints read by
the metrics collector at scrape time, so a stream costs a few integer additions and no metric-object calls.

What this module does not do: choose (picking.py), eject (health.py), ramp (warmup.py) or queue (admission.py), or any I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from balancer import capacity, picking
from balancer.config import BackendSpec, BalancerConfig
from contract import clock as clock_mod

TTFB_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Time-to-first-byte histogram bounds: from a cached answer (ms) to a long prefill under load (a minute)."""

TTFB_DECAY_S = 10.0
"""Peak-EWMA time constant: a slow first byte counts at once, and fades over ~10 s once backends recover."""


class Relayed(Protocol):
    """What a lease needs of a relayed response body: its byte count so far, and a way to cut it."""

    @property
    def total_bytes(self) -> int: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Backend:
    """One backend and everything the balancer knows about it. Mutated only on the event loop."""

    address: str
    weight: float = 1.0
    pod: str | None = None
    max_streams: int | None = None
    methods: tuple[str, ...] = ()
    source: str = "inline"
    joined_s: float = 0.0
    """Monotonic time it joined (or its pod started): the start of its warm-up ramp."""
    warm: bool = True
    draining: bool = False
    drain_started_s: float | None = None
    present: bool = True
    """False once its source dropped it: no new streams, kept only until its leases end."""

    active: int = 0
    queued: int = 0
    """Backend-reported waiting streams (scraped), or a saturating figure when the scrape is stale."""
    learned: capacity.Learned = field(default_factory=capacity.Learned)
    """Its concurrency limit as learned from its metrics (capacity.py); used when none is configured."""
    sessions: int = 0
    leases: set[Lease] = field(default_factory=set)

    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until_s: float | None = None

    ttfb_ewma_s: float = 0.0
    ttfb_samples: int = 0
    ttfb_updated_s: float = 0.0
    ttfb_buckets: list[int] = field(default_factory=lambda: [0] * (len(TTFB_BUCKETS_S) + 1))
    ttfb_sum_s: float = 0.0

    started: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    relayed_bytes: int = 0

    def state(self, now_s: float) -> str:
        """warming | ready | draining | ejected, at monotonic time `now_s`."""
        if self.ejected_until_s is not None and now_s < self.ejected_until_s:
            return "ejected"
        if self.draining or not self.present:
            return "draining"
        return "ready" if self.warm else "warming"

    def capacity_streams(self, default_per_weight: int | None) -> int | None:
        """Streams it carries before new ones queue, or None for no cap.

        A configured cap wins (its own `max_streams`, then `default_per_weight` scaled by weight); else the
        limit learned from its metrics; else none.
        """
        if self.max_streams is not None:
            return self.max_streams
        if default_per_weight is None:
            return self.learned.limit
        return max(1, math.floor(default_per_weight * self.weight))

    def observe_ttfb(self, ttfb_s: float, now_s: float) -> None:
        """Fold one time to first byte into the peak EWMA and the histogram."""
        if ttfb_s >= self.ttfb_ewma_s or self.ttfb_samples == 0:
            self.ttfb_ewma_s = ttfb_s
        else:
            keep = math.exp(-max(now_s - self.ttfb_updated_s, 0.0) / TTFB_DECAY_S)
            self.ttfb_ewma_s = self.ttfb_ewma_s * keep + ttfb_s * (1.0 - keep)
        self.ttfb_updated_s = now_s
        self.ttfb_samples += 1
        self.ttfb_sum_s += ttfb_s
        for i, bound in enumerate(TTFB_BUCKETS_S):
            if ttfb_s <= bound:
                self.ttfb_buckets[i] += 1
                break
        else:
            self.ttfb_buckets[-1] += 1

    def count_failure(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1


class ClientTransport(Protocol):
    """What a lease needs of the client's connection (asyncio's and uvloop's transports fit)."""

    def get_write_buffer_size(self) -> int: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def is_closing(self) -> bool: ...

    def abort(self) -> None: ...


class Lease:
    """One stream's load on one backend, from pick to end of stream.

    Two deadlines are checked from outside by a periodic sweep (`runtime.Balancer.sweep_idle`), so the
    per-chunk path carries no timer work:
    - idle: the backend sent nothing for `idle_timeout_s` (blamed on the backend, or on nobody for a quiet
      MCP notification stream). Time while the client's socket is backed up does not count: a backend that
      waits because we cannot deliver is not idle.
    - write: the client read nothing (our buffer to it stayed full) for `write_timeout_s`. The client is cut,
      the lease released, and the client blamed; without this a client that stops reading held its lease and
      its `max_streams` slot until it closed, and the healthy backend was charged an idle timeout.
    """

    __slots__ = (
        "_pool",
        "backend",
        "client",
        "client_delivered",
        "client_seen_s",
        "client_stalled",
        "idle_timed_out",
        "released",
        "seen_bytes",
        "seen_s",
        "started_s",
        "stream",
    )

    def __init__(self, pool: Pool, backend: Backend, started_s: float) -> None:
        self._pool = pool
        self.backend = backend
        self.started_s = started_s
        self.released = False
        self.stream: Relayed | None = None
        """The backend response being relayed, once its first byte arrived (watched for idleness)."""
        self.seen_bytes = 0
        self.seen_s = started_s
        self.idle_timed_out = False
        self.client: ClientTransport | None = None
        """The client's connection, once the response head goes out (watched for a stalled reader)."""
        self.client_delivered = 0
        self.client_seen_s = started_s
        self.client_stalled = False

    def watch(self, stream: Relayed, now_s: float, *, client: ClientTransport | None = None) -> None:
        """Start idle tracking of the relayed response (after its first byte) and of the client's reading."""
        self.stream = stream
        self.seen_bytes = stream.total_bytes
        self.seen_s = now_s
        if client is not None:
            self.client = client
            self.client_seen_s = now_s

    def check_idle(self, now_s: float, *, limit_s: float) -> bool:
        """Abort the stream if its byte count has not moved for `limit_s`; True when it did."""
        stream = self.stream
        if stream is None or self.released or self.idle_timed_out or self.client_stalled:
            return False
        total = stream.total_bytes
        backed_up = self.client is not None and self.client.get_write_buffer_size() > 0
        if total != self.seen_bytes or backed_up:
            self.seen_bytes = total
            self.seen_s = now_s
            return False
        if now_s - self.seen_s < limit_s:
            return False
        self.idle_timed_out = True
        stream.close()  # the relay's pending read fails and it ends the stream as a timeout
        return True

    def check_client(self, now_s: float, *, limit_s: float, queued_bytes: int) -> bool:
        """Cut a client that took no byte for `limit_s` while bytes waited for it; True when it did.

        Args:
            queued_bytes: bytes written for the client that it has not taken yet (our buffer plus the
                kernel's unacknowledged send queue; see `runtime.queued_to_client`), 0 when nothing waits.
        """
        client = self.client
        if client is None or self.released or self.client_stalled or client.is_closing():
            return False
        delivered = self.delivered_bytes(queued_bytes)
        if queued_bytes == 0 or delivered > self.client_delivered:
            self.client_delivered = delivered
            self.client_seen_s = now_s
            return False
        if now_s - self.client_seen_s < limit_s:
            return False
        self.client_stalled = True
        client.abort()  # the relay's pending write fails; it sees `client_stalled` and blames the client
        if self.stream is not None:
            self.stream.close()
        return True

    def delivered_bytes(self, queued_bytes: int) -> int:
        """Bytes the client has taken so far: relayed minus what still waits for it.

        Counting what was taken, not the buffer's size, keeps a slow reader that the backend outpaces from
        looking stalled: its buffer stays full while bytes keep moving. (Framing and TLS bytes in the queue
        make this a slight underestimate; it only has to grow when the client reads.)
        """
        relayed = self.stream.total_bytes if self.stream is not None else 0
        return relayed - queued_bytes

    def release(self) -> None:
        """End the stream's load; idempotent."""
        if self.released:
            return
        self.released = True
        backend = self.backend
        backend.active -= 1
        backend.leases.discard(self)
        self._pool.on_release(backend)


class Pool:
    """All backends, keyed by address, with the leases on them."""

    def __init__(self, config: BalancerConfig, *, clock: clock_mod.Clock) -> None:
        self.config = config
        self.clock = clock
        self.backends: dict[str, Backend] = {}
        self.listeners: list[Callable[[], None]] = []
        """Called with no argument when capacity may have freed up (a lease ended, a backend joined)."""

    def sync(
        self,
        specs: Iterable[BackendSpec],
        *,
        source: str,
        initial: bool = False,
        started_s: dict[str, float] | None = None,
    ) -> None:
        """Make `source`'s backends exactly `specs`; joiners warm up unless `initial` (present at startup).

        `started_s` gives a monotonic start time per address (a pod's start), dating its warm-up ramp.
        """
        now = self.clock.monotonic()
        started_s = started_s or {}
        wanted = {spec.address: spec for spec in specs}
        for address, backend in list(self.backends.items()):
            if backend.source == source and address not in wanted:
                backend.present = False
                self._forget_if_idle(backend)
        for spec in wanted.values():
            self.upsert(
                spec, source=source, initial=initial, now_s=now, started_s=started_s.get(spec.address)
            )
        self.notify()

    def upsert(
        self, spec: BackendSpec, *, source: str, initial: bool, now_s: float, started_s: float | None = None
    ) -> Backend:
        """Add or update one backend. `started_s` (monotonic) dates its warm-up, e.g. from the pod start."""
        backend = self.backends.get(spec.address)
        if backend is None or not backend.present:
            if backend is None:
                backend = Backend(address=spec.address)
                self.backends[spec.address] = backend
            backend.present = True
            backend.joined_s = now_s if started_s is None else started_s
            backend.warm = initial or self.config.slow_start_s == 0
            if not backend.warm and now_s - backend.joined_s >= self.config.slow_start_s:
                backend.warm = True
        backend.source = source
        backend.weight = spec.weight
        backend.pod = spec.pod
        backend.max_streams = spec.max_streams
        backend.methods = spec.methods
        self.set_draining(backend, spec.drain, now_s=now_s)
        return backend

    def set_draining(self, backend: Backend, draining: bool, *, now_s: float) -> None:
        if draining and not backend.draining:
            backend.drain_started_s = now_s
        if not draining:
            backend.drain_started_s = None
        backend.draining = draining

    def lease(self, backend: Backend) -> Lease:
        """Take one stream's load on `backend` (the caller releases it in `finally`)."""
        lease = Lease(self, backend, self.clock.monotonic())
        backend.active += 1
        backend.started += 1
        backend.leases.add(lease)
        return lease

    def on_release(self, backend: Backend) -> None:
        if not backend.present:
            self._forget_if_idle(backend)
        self.notify()

    def notify(self) -> None:
        for listener in self.listeners:
            listener()

    def present(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.present]

    def candidates(
        self, backends: Iterable[Backend], *, warm_factor: Callable[[Backend], float]
    ) -> list[picking.Candidate]:
        """Snapshot for picking; a backend at its stream cap is left out (it would only queue)."""
        now = self.clock.monotonic()
        cap = self.config.max_streams_per_backend
        out = []
        for b in backends:
            limit = b.capacity_streams(cap)
            if limit is not None and b.active >= limit:
                continue
            out.append(
                picking.Candidate(
                    key=b.address,
                    active=b.active + b.sessions,
                    queued=b.queued,
                    weight=b.weight,
                    ttfb_ewma_s=b.ttfb_ewma_s,
                    state=b.state(now),
                    warm_factor=warm_factor(b),
                )
            )
        return out

    def _forget_if_idle(self, backend: Backend) -> None:
        if backend.active == 0 and self.backends.get(backend.address) is backend:
            del self.backends[backend.address]
