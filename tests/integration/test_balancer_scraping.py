"""Backend-reported load: the queue an emulated vLLM reports on /metrics is merged into picking; a backend whose
metrics go stale counts as saturated."""

from __future__ import annotations

import asyncio

import aiohttp

from balancer import scraping
from contract import clock as clock_mod
from tests.fakes.balancer_env import balancer, completion_body, emulators, start_app


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
