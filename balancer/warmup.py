"""Warm-up of joining backends: slow start, so a new pod is measured before it gets its full share.

A backend that joins after startup (a new pod, possibly still loading its model or filling its caches) takes a
growing share: its weight is scaled by a factor ramping linearly from `MIN_WARM_FACTOR` to 1 over
`slow_start_s`. It is declared warm early once it has served `slow_start_min_samples` streams and its
time-to-first-byte EWMA is within `slow_start_settle_ratio` of the ready backends' median (it answers as fast
as the others, so there is nothing left to protect); the ramp time bounds the warm-up either way. Kubernetes
discovery dates the ramp from the pod's start time, so a balancer restart does not re-warm old pods.

Drain is a flag on the backend (backends.py): picking skips it, sessions stay where they are, and the signals
report what is left on it.

What this module does not do: pick (picking.py), queue (admission.py) or answer HTTP (proxy.py).
"""

from __future__ import annotations

import statistics

from balancer.backends import Backend, Pool
from balancer.config import BalancerConfig
from contract import clock as clock_mod

MIN_WARM_FACTOR = 0.1
"""Share of its weight a backend gets the moment it joins: enough to measure it, little enough to spare it."""


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
