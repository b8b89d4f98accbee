"""Picking: which backend a new stream goes to. Pure: a snapshot of candidates in, one candidate out.

A stream holds load from the pick to its last byte, so the load of a backend is its open streams
(`active`) plus what it reports waiting (`queued`), divided by what it can carry (`weight`, scaled down by
`warm_factor` while a new backend warms up). The least loaded eligible backend wins. Above a handful of
backends we sample two at random and keep the better one (power of two choices: near-best placement at O(1)
cost and no herd onto one backend when several balancer replicas see the same snapshot); below that a full
scan is cheap and strictly better. Ties go to the backend with the lower peak-EWMA time to first byte, so a
slow backend is avoided among equals.

The simulator places streams with the same function, so the live balancer and `forestall simulate` agree.

What this module does not do: keep the load figures (the balancer's lease table does), decide states
(health and drain do), or session affinity (sessions.py); it never does I/O and never reads a clock.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

FULL_SCAN_MAX: Final = 8
"""Up to this many eligible backends we scan them all: exact least-loaded costs little at this size, and two
random choices among few backends would too often miss the idle one."""

ELIGIBLE_STATES: Final = frozenset({"ready", "warming"})
"""States that take new streams; `draining` and `ejected` never do."""

MIN_WARM_FACTOR: Final = 0.05
"""Floor on the warm-up factor so a just-joined backend has a finite (high) load, not a division by zero."""


@dataclass(frozen=True)
class Candidate:
    """One backend as the picker sees it at this instant."""

    key: str
    """The backend's identity (its address)."""
    active: int
    """Streams open on it now, counted from pick to last byte."""
    queued: int = 0
    """Streams the backend itself reports waiting (vLLM `num_requests_waiting`)."""
    weight: float = 1.0
    """Relative capacity: a weight-2 backend carries twice the streams of a weight-1 one."""
    ttfb_ewma_s: float = 0.0
    """Peak-EWMA time to first byte in seconds; the tie-breaker."""
    state: str = "ready"
    """warming | ready | draining | ejected."""
    warm_factor: float = 1.0
    """Fraction of `weight` available while warming (0..1]; 1 once warm."""

    @property
    def load(self) -> float:
        """Normalised load: (active + queued) / (weight * warm_factor)."""
        capacity = max(self.weight, 1e-9) * max(self.warm_factor, MIN_WARM_FACTOR)
        return (self.active + self.queued) / capacity


def pick(candidates: Sequence[Candidate], *, rng: random.Random) -> Candidate | None:
    """The least loaded eligible candidate, or None when none is eligible.

    Full scan for up to `FULL_SCAN_MAX` eligible candidates, power of two choices above. Ties on load go to
    the lower time to first byte, then to the first in order (stable for tests and the simulator).
    """
    eligible = [c for c in candidates if c.state in ELIGIBLE_STATES]
    if not eligible:
        return None
    if len(eligible) <= FULL_SCAN_MAX:
        return min(eligible, key=_rank)
    first, second = rng.sample(eligible, 2)
    return first if _rank(first) <= _rank(second) else second


def _rank(candidate: Candidate) -> tuple[float, float]:
    return (candidate.load, candidate.ttfb_ewma_s)
