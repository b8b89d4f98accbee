"""Backend-reported load: scrape each backend's Prometheus `/metrics` for the queue it reports.

vLLM exposes `vllm:num_requests_running` and `vllm:num_requests_waiting`. The waiting figure is what our own
lease count cannot see (requests from other balancer replicas or clients that bypass us), so it is merged into
picking as `queued`. A figure is only as good as its age: when a backend's last successful scrape is older than
`STALE_PERIODS` scrape periods, it is treated as saturated (`queued` = its stream cap, or `STALE_QUEUED` when it
has none), so a backend whose metrics endpoint hangs is not mistaken for an idle one.

What this module does not do: act on the running figure (our leases are exact for our own streams) or scrape
anything but the text exposition format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from balancer.backends import Backend
from balancer.runtime import Balancer

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
STALE_PERIODS = 3
"""Scrapes that may fail in a row before the figures count as stale (one lost scrape is noise)."""
STALE_QUEUED = 1000
"""`queued` given to a stale backend without a stream cap: high enough that any fresh backend is preferred."""


def parse_waiting(text: str) -> int:
    """Sum of `vllm:num_requests_waiting` over its label sets (one per model); ValueError when absent."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == WAITING:
                total += sample.value
                found = True
    if not found:
        raise ValueError(f"{WAITING} is not in the scraped metrics")
    return int(total)


class Scraper:
    """Scrapes every present backend each period and updates `Backend.queued`."""

    def __init__(self, bal: Balancer) -> None:
        self.bal = bal
        self.last_ok_s: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            await self.scrape_once()
            await self.bal.clock.sleep(self.bal.config.scrape_interval_s)

    async def scrape_once(self) -> None:
        backends = self.bal.pool.present()
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
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with asyncio.timeout(self.bal.config.scrape_interval_s):
                async with client.get(url) as resp:
                    if resp.status != 200:
                        return
                    backend.queued = parse_waiting(await resp.text())
            self.last_ok_s[backend.address] = self.bal.clock.monotonic()
