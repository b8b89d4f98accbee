"""Backoff for the controller's retries: per-policy exponential delays and the supervision of background tasks.

A policy whose reconcile fails is retried after 1, 2, 4 ... seconds, capped at `MAX_DELAY_S`, instead of at
every cycle or in a hot loop (controller-runtime's per-item exponential rate limiter does the same, 5 ms to
1000 s; our cycle is 15 s, so a cap of five minutes keeps a broken policy visible without hammering the API).
A success forgets the failures. Delays are deterministic (no jitter): one controller acts at a time, so
there is no herd to spread, and tests can name the exact second of the next attempt.

`supervise()` keeps a never-ending background task (the leader elector) running: when it raises or returns
early, it is logged and started again after a backoff, and `on_restart` lets health and metrics see it.

What this module does not do: decide what failed or why; callers count failures and successes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from contract import clock as clock_mod

log = logging.getLogger(__name__)

BASE_DELAY_S = 1.0
"""First retry delay: long enough for a 409 or a restarting API server to settle."""

MAX_DELAY_S = 300.0
"""Longest delay: a policy broken for good is still retried (and its status refreshed) every five minutes."""

SUPERVISOR_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before restarting a crashed background task after consecutive crashes."""

STABLE_RUN_S = 60.0
"""A background task that ran this long before crashing starts its backoff again from the first delay."""


@dataclass
class _Entry:
    failures: int
    retry_at: float


class Backoff:
    """Exponential per-key retry delays on an injected monotonic clock."""

    def __init__(
        self, *, clock: clock_mod.Clock, base_s: float = BASE_DELAY_S, max_s: float = MAX_DELAY_S
    ) -> None:
        self.clock = clock
        self.base_s = base_s
        self.max_s = max_s
        self._entries: dict[Hashable, _Entry] = {}

    def failed(self, key: Hashable, *, at_least_s: float = 0.0) -> float:
        """Record a failure; returns the delay before the next attempt (at least `at_least_s`, e.g. a
        server's Retry-After)."""
        entry = self._entries.get(key)
        failures = 1 if entry is None else entry.failures + 1
        delay = max(at_least_s, min(self.max_s, self.base_s * 2.0 ** (failures - 1)))
        self._entries[key] = _Entry(failures, self.clock.monotonic() + delay)
        return delay

    def succeeded(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def forget(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def failures(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None else entry.failures

    def ready(self, key: Hashable) -> bool:
        """True when `key` has no pending delay."""
        entry = self._entries.get(key)
        return entry is None or self.clock.monotonic() >= entry.retry_at

    def next_retry_at(self) -> float | None:
        """Monotonic time of the earliest pending retry, or None."""
        pending = [e.retry_at for e in self._entries.values() if e.retry_at > self.clock.monotonic()]
        return min(pending) if pending else None


async def supervise(
    name: str,
    factory: Callable[[], Awaitable[None]],
    *,
    stop: asyncio.Event,
    clock: clock_mod.Clock,
    on_restart: Callable[[BaseException | None], None] | None = None,
) -> None:
    """Run `factory()` until `stop` is set, restarting it with a backoff whenever it raises or returns early."""
    crashes = 0
    while not stop.is_set():
        started = clock.monotonic()
        error: BaseException | None = None
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        if stop.is_set():
            return
        crashes = 1 if clock.monotonic() - started >= STABLE_RUN_S else crashes + 1
        delay = SUPERVISOR_DELAYS_S[min(crashes, len(SUPERVISOR_DELAYS_S)) - 1]
        if error is not None:
            log.error("%s crashed; restarting in %.0f s", name, delay, exc_info=error)
        else:
            log.error("%s ended while still needed; restarting in %.0f s", name, delay)
        if on_restart is not None:
            on_restart(error)
        sleeper = asyncio.ensure_future(clock.sleep(delay))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)
