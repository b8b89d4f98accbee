"""The balancer's live state in one object, and the placement rule that combines its parts.

`Balancer` owns the backend pool, warm-up, outlier detection, the retry budget, the admission queue, the MCP
session table and the affinity ring, plus the one aiohttp client session that talks to backends. `place()`
turns "a new stream arrived" into a held lease: eligible backends (present, not draining or ejected, under their
stream cap, serving the MCP method if one is named), then affinity or bounded-load session placement, then
`picking.pick`; when nothing fits it waits in the admission queue.

It lives apart from proxy.py so the admin API, the signals and the tests can reach the state without HTTP.

What this module does not do: HTTP (proxy.py, websockets.py), discovery or background tasks (app.py).
"""

from __future__ import annotations

import fcntl
import random
import ssl
import struct
import termios
from dataclasses import dataclass

import aiohttp

from balancer import admission, health, picking, relay, sessions, warmup
from balancer.backends import Backend, ClientTransport, Lease, Pool
from balancer.config import BalancerConfig
from contract import clock as clock_mod


class Balancer:
    """All state of one balancer replica."""

    def __init__(
        self,
        config: BalancerConfig,
        *,
        clock: clock_mod.Clock = clock_mod.SYSTEM,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.pool = Pool(config, clock=clock)
        self.warmup = warmup.WarmUp(self.pool, config, clock=clock)
        self.outliers = health.OutlierDetector(self.pool, config, clock=clock)
        self.budget = health.RetryBudget(ratio=config.retry_budget_ratio, min_retries=config.retry_budget_min)
        self.admission = admission.AdmissionQueue(self.pool, config, clock=clock)
        self.sessions = sessions.SessionTable(
            self.pool,
            idle_timeout_s=config.session_idle_timeout_s,
            clock=clock,
            max_per_client=config.max_sessions_per_client,
            max_total=config.max_sessions,
        )
        self.seal = sessions.SessionSeal.from_file(config.session_key_file)
        self.ring = sessions.HashRing()
        self.client: aiohttp.ClientSession | None = None
        self.backend_ssl: ssl.SSLContext | None = None
        self.scheme = "https" if config.backend_tls else "http"
        self.ws_scheme = "wss" if config.backend_tls else "ws"
        # No sock_read: aiohttp would re-arm a timer on every chunk; idle streams are found by `sweep_idle`.
        self.client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s)
        self.pool.sync(config.backends, source="inline", initial=True)

    async def start(self) -> None:
        """Open the client session to the backends (on the running loop)."""
        if self.config.backend_tls:
            self.backend_ssl = ssl.create_default_context(
                cafile=str(self.config.backend_ca) if self.config.backend_ca else None
            )
            if self.config.backend_cert is not None:
                self.backend_ssl.load_cert_chain(str(self.config.backend_cert), str(self.config.backend_key))
        self.client = aiohttp.ClientSession(
            connector=relay.Connector(limit=0, ssl=self.backend_ssl if self.backend_ssl else True),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=self.client_timeout,
            trust_env=False,
        )

    def sweep_idle(self) -> int:
        """Abort streams whose client stopped reading for `write_timeout_s` or whose backend sent nothing for
        `idle_timeout_s`; returns how many were aborted.

        Each open stream's byte counter and client buffer are compared with the last sweep's, so the per-chunk
        path carries no timer work; a stream is cut at most one sweep period after its limit.
        """
        now = self.clock.monotonic()
        idle_s, write_s = self.config.idle_timeout_s, self.config.write_timeout_s
        aborted = 0
        for backend in list(self.pool.backends.values()):
            for lease in list(backend.leases):
                queued = queued_to_client(lease.client) if lease.client is not None else 0
                stalled = lease.check_client(now, limit_s=write_s, queued_bytes=queued)
                if stalled or lease.check_idle(now, limit_s=idle_s):
                    aborted += 1
        return aborted

    def open_session(self, session_id: str) -> SessionRoute:
        """Where a request carrying the sealed `session_id` goes, or why it cannot."""
        opened = self.seal.open(session_id)
        if opened is None:
            return SessionRoute(None, "", "unknown")
        address, backend_id = opened
        backend = self.pool.backends.get(address)
        if backend is None or not backend.present:
            self.sessions.end(session_id)
            return SessionRoute(None, backend_id, "gone")
        now = self.clock.monotonic()
        if backend.state(now) == "ejected":
            assert backend.ejected_until_s is not None
            return SessionRoute(backend, backend_id, "ejected", backend.ejected_until_s - now)
        return SessionRoute(backend, backend_id, None)

    def has_other(self, *, exclude: frozenset[str], method: str | None = None) -> bool:
        """Whether a backend outside `exclude` could take a stream now or after a wait in the queue."""
        now = self.clock.monotonic()
        return any(
            b.present
            and b.address not in exclude
            and (method is None or not b.methods or method in b.methods)
            and b.state(now) in picking.ELIGIBLE_STATES
            for b in self.pool.backends.values()
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def choose(
        self,
        *,
        exclude: frozenset[str] = frozenset(),
        affinity_key: str | None = None,
        method: str | None = None,
        new_session: bool = False,
    ) -> Backend | None:
        """The backend for a new stream now, or None when none can take it."""
        self.warmup.refresh()
        pool = self.pool
        backends = [b for b in pool.backends.values() if b.present and b.address not in exclude]
        if method is not None:
            backends = [b for b in backends if not b.methods or method in b.methods]
        candidates = pool.candidates(backends, warm_factor=self.warmup.factor)
        eligible = [c for c in candidates if c.state in picking.ELIGIBLE_STATES]
        if not eligible:
            return None
        if affinity_key is not None:
            return self.ring.choose(
                affinity_key, [pool.backends[c.key] for c in eligible], epsilon=self.config.session_epsilon
            )
        if new_session:
            fits = {
                b.address
                for b in sessions.under_bound(
                    [pool.backends[c.key] for c in eligible], epsilon=self.config.session_epsilon
                )
            }
            eligible = [c for c in eligible if c.key in fits]
        chosen = picking.pick(eligible, rng=self.rng)
        return None if chosen is None else pool.backends[chosen.key]

    async def place(
        self,
        *,
        exclude: frozenset[str] = frozenset(),
        affinity_key: str | None = None,
        method: str | None = None,
        new_session: bool = False,
    ) -> Lease:
        """A lease on the chosen backend, waiting in the admission queue if every backend is full.

        Retries come through here too (with `exclude`), so they queue behind waiting streams and obey the
        bounded-load rule like a first attempt.

        Raises:
            NoBackendError: the queue is full or the wait ran out.
        """

        def attempt() -> Lease | None:
            backend = self.choose(
                exclude=exclude, affinity_key=affinity_key, method=method, new_session=new_session
            )
            return None if backend is None else self.pool.lease(backend)

        return await self.admission.admit(attempt)


def queued_to_client(transport: ClientTransport) -> int:
    """Bytes written for a client that it has not taken: the transport's buffer plus, when that is not empty,
    the kernel's unacknowledged send queue (TIOCOUTQ). 0 while our buffer is empty (nothing is backed up).

    The kernel queue matters because it is large (megabytes, autotuned): a client that reads slowly drains it
    long before our own buffer shrinks, and only this sum shows that it is reading.
    """
    buffered = transport.get_write_buffer_size()
    if buffered == 0:
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return buffered
    try:
        unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        unsent = 0
    return buffered + int(unsent)


@dataclass(frozen=True)
class SessionRoute:
    """Where a legacy MCP session's request goes (`refusal` None), or why it cannot.

    `refusal`: "unknown" (the id does not open: 404), "gone" (its backend left: 404), "ejected" (its backend
    is out for `retry_after_s`: 503, the session is kept).
    """

    backend: Backend | None
    backend_session_id: str
    refusal: str | None
    retry_after_s: float = 0.0
