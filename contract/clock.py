"""Time, in one place: the only module allowed to read the wall clock or the monotonic clock.

Everything that needs time takes a `Clock` (real in production, `FakeClock` in tests and the simulator) so
that tests control time with `advance()` instead of sleeping, and no test races the machine's load.
`tests/unit/test_clock.py` (`test_no_wall_clock_reads_outside_clock_module`) fails if another module calls `time.time()`, `time.monotonic()` or
`datetime.now()` directly.

It lives in `contract/`, the one package the controller and the balancer both import (`forecast/` is given
timestamps and never asks for them).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    """Where time comes from."""

    def now(self) -> float:
        """Unix time in seconds (for reports, timestamps and Kubernetes fields)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for durations, timeouts, EWMAs)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait this many seconds of this clock's time."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told: `advance(s)` wakes every sleeper whose time has come."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.start = start
        self._t = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.start + self._t

    def monotonic(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._t + seconds, future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the sleepers that are due (they run at the loop's next turn)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance() got {seconds}")
        self._t += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self._t]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._t]
        for _, future in due:
            if not future.done():
                future.set_result(None)


def utc_iso(unix_s: float) -> str:
    """RFC 3339 UTC timestamp with second precision, as Kubernetes writes them (`2026-11-23T16:07:48Z`)."""
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


SYSTEM = SystemClock()
"""The shared real clock; pass a FakeClock instead in tests."""
