"""The end-to-end tests' load: streaming completions through the balancer at a scripted rate, every outcome counted.

`LoadGenerator.run(profile)` sends OpenAI-style `stream: true` requests to the balancer at the arrival rate
the profile gives for each moment (streams per second, piecewise linear between `(t_s, rate)` points,
arrivals evenly spaced), each asking for `tokens` tokens, and reads every stream to its end. The streams are
`emulation.loadgen.stream`, the one client the demo and the benchmarks use too, so each ends in exactly one
`emulation.loadgen.StreamOutcome` (ok, error, cut, rejected, abandoned), classified the same way everywhere;
`outcomes` tallies them. `abandon_one()` starts a stream the client walks away from after its first event,
which the balancer must count as a client-side failure and nothing else.

It also samples its own concurrency (streams open now) after every change, so a test can say when demand
reached a level without asking the system under test. Times come from the injected `Clock`'s
`monotonic()`.

What it does not do: replay traces (`emulation.demo` does that), retry, or assert anything.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import urllib.parse
from collections.abc import Sequence

from contract import clock as clock_mod
from emulation import loadgen

MAX_STREAMS = 2000
"""Streams one run may start at most: bounds a runaway profile (the e2e runs send a few hundred)."""

STREAM_TIMEOUT_S = 120.0
"""A stream not done by then ends as error or cut (the e2e streams take seconds)."""

Outcomes = loadgen.Tally


class LoadGenerator:
    """Streams through the balancer at a scripted rate; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        tokens: int,
        clock: clock_mod.Clock = clock_mod.SYSTEM,
        origin_s: float | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"LoadGenerator needs an http://host:port URL, got {url!r}")
        self.target = (parts.hostname, parts.port)
        self.tokens = tokens
        self.clock = clock
        self.origin_s = clock.monotonic() if origin_s is None else origin_s
        """Profile times are seconds since this monotonic instant."""
        self.outcomes = Outcomes()
        self.concurrency: list[tuple[float, int]] = []
        """(monotonic time, streams open) after every start and end."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LoadGenerator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain(timeout_s=30.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def elapsed_s(self) -> float:
        return self.clock.monotonic() - self.origin_s

    def peak_concurrency(self) -> int:
        return max((n for _, n in self.concurrency), default=0)

    def first_time_at_least(self, streams: int) -> float | None:
        """Monotonic time at which the open streams first reached `streams`, None if they never did."""
        return next((t for t, n in self.concurrency if n >= streams), None)

    async def run(self, profile: Sequence[tuple[float, float]], *, until_s: float) -> None:
        """Start streams at `rate(t)` from now (profile time) until `until_s` (profile time); do not wait for them."""
        credit = 0.0
        last = self.elapsed_s()
        tick_s = 0.02
        for _ in range(math.ceil((until_s - last) / tick_s) + 1):
            now = self.elapsed_s()
            if now >= until_s or self.outcomes.started >= MAX_STREAMS:
                return
            credit += rate_at(profile, now) * (now - last)
            last = now
            while credit >= 1.0 and self.outcomes.started < MAX_STREAMS:
                credit -= 1.0
                self._start(abandon=False)
            await self.clock.sleep(tick_s)

    def abandon_one(self) -> None:
        """Start one stream and walk away from it after its first event (a client that goes away)."""
        self._start(abandon=True)

    async def drain(self, *, timeout_s: float) -> bool:
        """Wait for the streams started so far to end; False if some are still open at the timeout."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not pending

    def _start(self, *, abandon: bool) -> None:
        self.outcomes.started += 1
        self._sample()
        task = asyncio.create_task(self._one(abandon=abandon))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sample(self) -> None:
        self.concurrency.append((self.clock.monotonic(), self.outcomes.open))

    async def _one(self, *, abandon: bool) -> None:
        outcome = await loadgen.stream(
            self.target, max_tokens=self.tokens, model="e2e", timeout_s=STREAM_TIMEOUT_S, abandon=abandon
        )
        self.outcomes.add(outcome)
        self._sample()


def rate_at(profile: Sequence[tuple[float, float]], t_s: float) -> float:
    """Streams per second at profile time `t_s`: linear between points, flat outside them."""
    if not profile:
        return 0.0
    if t_s <= profile[0][0]:
        return profile[0][1]
    for (t0, r0), (t1, r1) in itertools.pairwise(profile):
        if t0 <= t_s <= t1:
            return r0 if t1 == t0 else r0 + (r1 - r0) * (t_s - t0) / (t1 - t0)
    return profile[-1][1]
