"""Backend-reported load: the queue an emulated vLLM reports on /metrics is merged into picking; a backend whose
metrics go stale counts as saturated."""

from __future__ import annotations

import asyncio

import aiohttp

from balancer import scraping
from contract import clock as clock_mod
from tests.fakes.balancer_env import (
    balancer,
    completion_body,
    emulators,
    scripted_backend,
    start_app,
    wait_until,
)


async def test_scraped_waiting_streams_steer_new_streams_and_stale_figures_saturate() -> None:
    fake = clock_mod.FakeClock()
    one_slot = {"slots": 1, "ttft_s": 0.0, "seconds_per_token": 1000.0}
    runner, dead = await start_app(aiohttp.web.Application())
    await runner.cleanup()  # nothing listens there any more
    async with (
        emulators(one_slot, one_slot, clock=fake) as addrs,
        balancer([*addrs, dead], clock=fake, scrape_interval_s=5.0) as lb,
        aiohttp.ClientSession() as http,
    ):
        # Another client loads the first backend behind our back: 1 running, 2 waiting.
        direct = [
            asyncio.create_task(http.post(f"http://{addrs[0]}/v1/completions", json=completion_body()))
            for _ in range(3)
        ]
        scraper = scraping.Scraper(lb.bal)
        async with asyncio.timeout(10):
            while lb.bal.pool.backends[addrs[0]].queued != 2:  # until all three reached the backend
                await scraper.scrape_once()
        busy, idle, gone = (lb.bal.pool.backends[a] for a in (*addrs, dead))
        assert (busy.queued, idle.queued) == (2, 0)
        assert gone.queued == 0  # a newcomer gets the same grace as everyone
        fake.advance(16.0)  # more than 3 scrape periods without a good scrape
        await scraper.scrape_once()
        assert gone.queued == scraping.STALE_QUEUED and idle.queued == 0
        gone.draining = True  # keep the dead one out of the way; the choice is between the two live ones
        assert lb.bal.choose() is idle
        for task in direct:
            task.cancel()
        for result in await asyncio.gather(*direct, return_exceptions=True):
            if isinstance(result, aiohttp.ClientResponse):
                result.close()


async def test_a_limit_learned_from_the_backend_queue_keeps_excess_streams_in_the_balancer() -> None:
    """Not told its slots, the balancer learns them from the backend's running/waiting/KV-cache figures; from
    then on the streams beyond them wait in the balancer's admission queue, not inside the pod."""
    fake = clock_mod.FakeClock()
    two_slots = {"slots": 2, "ttft_s": 0.0, "seconds_per_token": 1000.0}  # streams hold their slot
    async with (
        emulators(two_slots, clock=fake) as addrs,
        balancer(addrs, clock=fake, admission_wait_s=1000.0) as lb,
        aiohttp.ClientSession() as http,
    ):
        streams = [
            asyncio.create_task(http.post(f"{lb.url}/v1/completions", json=completion_body()))
            for _ in range(3)
        ]
        backend = lb.bal.pool.backends[addrs[0]]
        scraper = scraping.Scraper(lb.bal)
        async with asyncio.timeout(10):
            while backend.queued != 1:  # two run, one waits inside the pod
                await scraper.scrape_once()
        # Two run, one waits, its KV cache is full: the limit is measured in one scrape.
        assert backend.learned.limit == 2 and backend.learned.seen_full
        assert backend.capacity_streams(None) == 2
        fourth = asyncio.create_task(http.post(f"{lb.url}/v1/completions", json=completion_body()))
        await wait_until(lambda: len(lb.bal.admission) == 1, what="the fourth stream waits in the balancer")
        await scraper.scrape_once()
        assert backend.queued == 1 and lb.active() == 3  # the pod's own queue did not grow
        for task in [*streams, fourth]:
            task.cancel()
        for result in await asyncio.gather(*streams, fourth, return_exceptions=True):
            if isinstance(result, aiohttp.ClientResponse):
                result.close()


async def test_a_backend_without_load_metrics_is_not_judged_on_them() -> None:
    async def plain(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        if request.path == "/metrics":
            return aiohttp.web.Response(text="# no inference server here\nprocess_cpu_seconds_total 1\n")
        return aiohttp.web.json_response({"ok": True})

    fake = clock_mod.FakeClock()
    runner, address = await scripted_backend(plain)
    try:
        async with balancer([address], clock=fake) as lb:
            scraper = scraping.Scraper(lb.bal)
            await scraper.scrape_once()
            fake.advance(16.0)  # long past the staleness horizon: it answered, so it is not stale
            await scraper.scrape_once()
            backend = lb.bal.pool.backends[address]
            assert backend.queued == 0 and backend.learned.limit is None
            assert address in scraper.no_metrics_s  # asked again only every NO_METRICS_RETRY_S
    finally:
        await runner.cleanup()
