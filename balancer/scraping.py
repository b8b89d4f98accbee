"""Backend-reported load: scrape each backend's Prometheus `/metrics` for its queue and its concurrency limit.

vLLM, SGLang and TGI publish how many requests run and wait (names in capacity.py). The waiting figure is what
our own lease count cannot see (requests from other balancer replicas or clients that bypass us), so it is
merged into picking as `queued`; the running and waiting figures together teach the backend's concurrency
limit (`capacity.learn`), which caps its streams when no cap is configured.

A figure is only as good as its age: when a backend that answered its scrapes stops answering them for
`STALE_PERIODS` periods (refused, reset, timed out), it is treated as saturated (`queued` = its stream cap, or
`STALE_QUEUED` when it has none), so a backend whose metrics endpoint hangs is not mistaken for an idle one.
A backend that answers but publishes none of the names (an MCP server, a plain HTTP service) is not judged on
metrics at all, and is asked again only every `NO_METRICS_RETRY_S`.

What this module does not do: act on the running figure for picking (our leases are exact for our own
streams), or scrape anything but the text exposition format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from balancer import capacity
from balancer.backends import Backend
from balancer.runtime import Balancer

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
STALE_PERIODS = 3
"""Scrapes that may fail in a row before the figures count as stale (one lost scrape is noise)."""
STALE_QUEUED = 1000
"""`queued` given to a stale backend without a stream cap: high enough that any fresh backend is preferred."""
NO_METRICS_RETRY_S = 60.0
"""How often a backend without load metrics is asked again (it may be a server that starts publishing them)."""


def parse_waiting(text: str) -> int:
    """Requests the backend reports waiting (summed over label sets); ValueError when it reports none."""
    sample = capacity.parse(text)
    if sample is None:
        raise ValueError(f"{WAITING} (or an SGLang/TGI equivalent) is not in the scraped metrics")
    return int(sample.waiting)


class Scraper:
    """Scrapes every present backend each period; updates `Backend.queued` and `Backend.learned`."""

    def __init__(self, bal: Balancer) -> None:
        self.bal = bal
        self.last_ok_s: dict[str, float] = {}
        self.no_metrics_s: dict[str, float] = {}
        """Backends that answered without load metrics, and when."""

    async def run(self) -> None:
        while True:
            await self.scrape_once()
            await self.bal.clock.sleep(self.bal.config.scrape_interval_s)

    async def scrape_once(self) -> None:
        now = self.bal.clock.monotonic()
        backends = [
            b
            for b in self.bal.pool.present()
            if now - self.no_metrics_s.get(b.address, -NO_METRICS_RETRY_S) >= NO_METRICS_RETRY_S
        ]
        async with asyncio.TaskGroup() as group:
            for backend in backends:
                group.create_task(self._scrape(backend))
        now = self.bal.clock.monotonic()
        horizon_s = STALE_PERIODS * self.bal.config.scrape_interval_s
        for backend in backends:
            seen = self.last_ok_s.setdefault(backend.address, now)  # a newcomer gets the same grace
            if now - seen > horizon_s:
                backend.queued = (
                    backend.capacity_streams(self.bal.config.max_streams_per_backend) or STALE_QUEUED
                )

    async def _scrape(self, backend: Backend) -> None:
        client = self.bal.client
        if client is None:
            return
        url = f"{self.bal.scheme}://{backend.address}/metrics"
        text: str | None = None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with asyncio.timeout(self.bal.config.scrape_interval_s):
                async with client.get(url) as resp:
                    text = await resp.text() if resp.status == 200 else ""
        if text is None:
            return  # no answer: counts towards staleness
        now = self.bal.clock.monotonic()
        self.last_ok_s[backend.address] = now
        sample = capacity.parse(text)
        if sample is None:
            self.no_metrics_s[backend.address] = now
            backend.queued = 0
            return
        self.no_metrics_s.pop(backend.address, None)
        backend.queued = int(sample.waiting)
        before = backend.learned.limit
        limit = capacity.learn(backend.learned, sample, now_s=now, queue_waiting=len(self.bal.admission) > 0)
        if limit != before:
            how = "measured from its queue" if backend.learned.seen_full else "estimated from its KV cache"
            log.log(
                logging.INFO if backend.learned.seen_full else logging.DEBUG,
                "backend %s: concurrency limit %s, %s (was %s)",
                backend.address,
                limit,
                how,
                before,
            )
            self.bal.pool.notify()  # a higher limit may admit a waiting stream now
