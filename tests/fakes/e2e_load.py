"""A load generator for end-to-end tests: streaming completions through the balancer, every outcome counted.

`LoadGenerator.run(profile)` sends OpenAI-style `stream: true` requests to the balancer at the arrival rate
the profile gives for each moment (streams per second, piecewise linear between `(t_s, rate)` points,
arrivals evenly spaced), each asking for `tokens` tokens, and reads every stream to its end. Each stream ends
in exactly one outcome:

- `completed`: the SSE stream reached `data: [DONE]`;
- `cut`: bytes arrived but the stream ended without `[DONE]` (an error event, a reset, a premature EOF);
- `failed`: no byte arrived (connect error, a non-200 answer other than 503/429);
- `rejected`: 503 or 429 (the balancer's admission said no);
- `abandoned`: the generator itself gave up on it on purpose (`abandon_one()`), which the balancer must
  count as a client-side failure and nothing else.

It also samples its own concurrency (streams open now) after every change, so a test can say when demand
reached a level without asking the system under test. Times come from the injected `Clock`'s
`monotonic()`.

What it does not do: replay traces (`emulation.demo` does that), retry, or assert anything.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from contract import clock as clock_mod

MAX_STREAMS = 2000
"""Streams one run may start at most: bounds a runaway profile (the e2e runs send a few hundred)."""


@dataclass
class Outcomes:
    """How every stream ended (see the module docstring), and errors seen on cut or failed ones."""

    started: int = 0
    completed: int = 0
    cut: int = 0
    failed: int = 0
    rejected: int = 0
    abandoned: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def open(self) -> int:
        return self.started - self.completed - self.cut - self.failed - self.rejected - self.abandoned


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
        self.url = url.rstrip("/") + "/v1/chat/completions"
        self.tokens = tokens
        self.clock = clock
        self.origin_s = clock.monotonic() if origin_s is None else origin_s
        """Profile times are seconds since this monotonic instant."""
        self.outcomes = Outcomes()
        self.concurrency: list[tuple[float, int]] = []
        """(monotonic time, streams open) after every start and end."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LoadGenerator:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=120, sock_connect=5),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain(timeout_s=30.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

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
        """Start one stream and walk away from it after its first chunk (a client that goes away)."""
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
        assert self._session is not None
        body = {
            "model": "e2e",
            "stream": True,
            "max_tokens": self.tokens,
            "messages": [{"role": "user", "content": "hello"}],
        }
        got_bytes = False
        outcome = "cut"
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status in (429, 503):
                    outcome = "rejected"
                    return
                if resp.status != 200:
                    outcome = "failed"
                    self.outcomes.errors.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    return
                async for line in resp.content:
                    got_bytes = True
                    if abandon:
                        outcome = "abandoned"
                        resp.close()
                        return
                    if line.startswith(b"data: [DONE]"):
                        outcome = "completed"
                    elif line.startswith(b"data:") and b'"error"' in line[:64]:
                        self.outcomes.errors.append(line.decode(errors="replace")[:200])
                if outcome != "completed":
                    self.outcomes.errors.append("stream ended without [DONE]")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not got_bytes:
                outcome = "failed"
            self.outcomes.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        finally:
            setattr(self.outcomes, outcome, getattr(self.outcomes, outcome) + 1)
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
