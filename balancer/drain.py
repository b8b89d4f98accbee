"""Capacity events: warm-up of joining backends, and the admission queue for when every backend is full.

Slow start. A backend that joins after startup (a new pod, possibly still loading its model or filling its
caches) takes a growing share: its weight is scaled by a factor ramping linearly from `MIN_WARM_FACTOR` to 1
over `slow_start_s`. It is declared warm early once it has served `slow_start_min_samples` streams and its
time-to-first-byte EWMA is within `slow_start_settle_ratio` of the ready backends' median (it answers as fast
as the others, so there is nothing left to protect); the ramp time bounds the warm-up either way. Kubernetes
discovery dates the ramp from the pod's start time, so a balancer restart does not re-warm old pods.

Drain itself is a flag on the backend (backends.py): picking skips it, sessions stay where they are, and the
signals report what is left on it; this module only ramps and queues.

Admission. When no backend can take a stream (each is at its stream cap, or none is eligible yet) the stream
waits in a FIFO queue bounded in length (`admission_queue_max`) and in time (`admission_wait_s`), because the
controller is bringing capacity; past either bound it gets 503 with `Retry-After`. Never an unbounded queue: a
balancer that queues forever hides the overload from the clients and from the autoscaler.

What this module does not do: pick (picking.py) or answer HTTP (proxy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from balancer.backends import Backend, Pool
from balancer.config import BalancerConfig
from balancer.errors import NoBackendError
from contract import clock as clock_mod

MIN_WARM_FACTOR = 0.1
"""Share of its weight a backend gets the moment it joins: enough to measure it, little enough to spare it."""

T = TypeVar("T")


class WarmUp:
    """Computes warm factors and promotes settled backends to ready."""

    def __init__(self, pool: Pool, config: BalancerConfig, *, clock: clock_mod.Clock) -> None:
        self.pool = pool
        self.config = config
        self.clock = clock

    def refresh(self) -> None:
        """Promote every warming backend whose ramp is over or whose TTFB has settled."""
        now = self.clock.monotonic()
        warming = [b for b in self.pool.backends.values() if not b.warm]
        if not warming:
            return
        reference = [b.ttfb_ewma_s for b in self.pool.backends.values() if b.warm and b.ttfb_samples]
        median = statistics.median(reference) if reference else None
        for backend in warming:
            if now - backend.joined_s >= self.config.slow_start_s:
                backend.warm = True
            elif backend.ttfb_samples >= self.config.slow_start_min_samples and (
                median is None or backend.ttfb_ewma_s <= self.config.slow_start_settle_ratio * median
            ):
                backend.warm = True

    def factor(self, backend: Backend) -> float:
        """Fraction of its weight the backend gets now (1 when warm)."""
        if backend.warm or self.config.slow_start_s <= 0:
            return 1.0
        elapsed = self.clock.monotonic() - backend.joined_s
        return min(1.0, max(MIN_WARM_FACTOR, elapsed / self.config.slow_start_s))


class AdmissionQueue:
    """A bounded FIFO of streams waiting for a backend to free up or join."""

    def __init__(self, pool: Pool, config: BalancerConfig, *, clock: clock_mod.Clock) -> None:
        self.config = config
        self.clock = clock
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejected_total = 0
        pool.listeners.append(self.wake)

    def __len__(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def wake(self) -> None:
        """Let the first waiter try again (called when a lease ends or a backend joins)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def admit(self, try_place: Callable[[], T | None]) -> T:
        """`try_place()` now, else wait in line and retry it when woken, until admitted or out of time.

        Raises:
            NoBackendError: the queue is full or the wait ran out (the caller answers 503 + Retry-After).
        """
        placed = try_place()
        if placed is not None:
            return placed
        if len(self) >= self.config.admission_queue_max or self.config.admission_wait_s <= 0:
            self.rejected_total += 1
            raise NoBackendError(
                "every backend is at capacity and the admission queue is full", reason="full"
            )
        timer = asyncio.ensure_future(self.clock.sleep(self.config.admission_wait_s))
        first_turn = True
        try:
            while True:
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                # A waiter woken without success keeps its place at the head of the line.
                (self._waiters.append if first_turn else self._waiters.appendleft)(waiter)
                first_turn = False
                try:
                    await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        self.wake()  # we were handed capacity but leave: pass it on
                    raise
                finally:
                    if not waiter.done():
                        waiter.cancel()
                placed = try_place()
                if placed is not None:
                    return placed
                if timer.done():
                    self.rejected_total += 1
                    raise NoBackendError(
                        f"no backend freed up within {self.config.admission_wait_s:g}s", reason="wait"
                    )
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
