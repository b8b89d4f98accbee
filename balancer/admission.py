"""The admission queue: where a stream waits when no backend can take it now.

When no backend can take a stream (each is at its stream cap, or none is eligible yet) the stream waits in a
FIFO queue bounded in length (`admission_queue_max`) and in time (`admission_wait_s`), because the controller
is bringing capacity; past either bound it gets 503 with `Retry-After`. Never an unbounded queue: a balancer
that queues forever hides the overload from the clients and from the autoscaler. A retry (proxy.py) waits in
the same line as a first attempt, so retries cannot overtake streams already waiting.

What this module does not do: pick (picking.py, runtime.py) or answer HTTP (proxy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from balancer.backends import Pool
from balancer.config import BalancerConfig
from balancer.errors import NoBackendError
from contract import clock as clock_mod

T = TypeVar("T")


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
