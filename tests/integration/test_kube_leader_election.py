"""Leader election on a coordination.k8s.io/v1 Lease: two controller replicas, one acts, the other takes over.

Time is a FakeClock shared by both replicas and the API server: lease durations are counted in its seconds,
so a takeover is driven by `advance()`, never by waiting.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from contract import clock as clock_mod
from controller import decide, loop, metrics, policy
from controller.kube import api as kube_api_mod
from controller.kube import lease
from tests.fakes import kube_api
from tests.fakes.kube_api import FakeKubeApi, advance_until, eventually

NS = "llm"
LEASE = {"lease_duration_s": 6.0, "renew_deadline_s": 4.0, "retry_period_s": 1.0}


class NoDemand:
    async def read(
        self, scaling_policy: policy.ScalingPolicy, *, now: float, horizon_s: float
    ) -> tuple[None, None]:
        return None, None


def holder(api: FakeKubeApi) -> str | None:
    obj = api.get("coordination.k8s.io", "leases", NS, "forestall-controller")
    return None if obj is None else obj["spec"].get("holderIdentity")


async def test_only_the_leader_acts_and_the_other_takes_over_when_it_stops() -> None:
    clock = clock_mod.FakeClock(start=1_800_000_000.0)
    async with FakeKubeApi(clock=clock, bookmark_interval_s=0.1) as api:
        api.put(kube_api.deployment("chat", NS, replicas=2))
        api.put(kube_api.scaling_policy("chat", NS))
        decided: dict[str, int] = {"a": 0, "b": 0}
        replicas: dict[str, Any] = {}
        for name in ("a", "b"):
            client = kube_api_mod.client_for(api.url)

            def counting(*args: Any, _name: str = name, **inputs: Any) -> decide.Plan:
                decided[_name] += 1
                return decide.decide(*args, **inputs)

            elector = lease.LeaseElector(
                client, name="forestall-controller", namespace=NS, identity=name, clock=clock, **LEASE
            )
            controller = loop.Controller(
                client,
                demand=NoDemand(),
                clock=clock,
                controller_metrics=metrics.ControllerMetrics(CollectorRegistry()),
                namespace=NS,
                identity=name,
                elector=elector,
                decide_fn=counting,
            )
            stop = asyncio.Event()
            replicas[name] = (controller, elector, stop, client)
        tasks = {name: asyncio.create_task(r[0].run(r[2])) for name, r in replicas.items()}
        try:
            await eventually(lambda: holder(api) in ("a", "b"), "a leader")
            leader = holder(api)
            assert leader is not None
            follower = "b" if leader == "a" else "a"
            await eventually(lambda: decided[leader] >= 1, "the leader reconciles")
            # a reconcile interval of renewals later, still one actor: the leader renews every retry period
            while clock.monotonic() < 16.0:
                renewals = len(api.calls("update", "leases"))
                await advance_until(
                    clock, lambda r=renewals: len(api.calls("update", "leases")) > r, "a renewal", step_s=1.0
                )
                assert holder(api) == leader
            await eventually(lambda: decided[leader] >= 2, "the leader reconciles every interval")
            assert replicas[leader][1].is_leader and not replicas[follower][1].is_leader
            assert decided[follower] == 0
            status_writers = {e["reportingInstance"] for e in api.objects("events.k8s.io", "events", NS)}
            assert status_writers <= {leader}

            # the leader stops (SIGTERM): it releases the Lease, the follower takes over within a retry period
            replicas[leader][2].set()
            await tasks[leader]
            assert holder(api) is None
            await advance_until(
                clock, lambda: holder(api) == follower, "the follower takes the lease", step_s=1.0
            )
            assert clock.monotonic() < 16.0 + LEASE["lease_duration_s"]  # sooner than a lease expiry
            await eventually(lambda: decided[follower] >= 1, "the new leader reconciles")
            stored = api.get("coordination.k8s.io", "leases", NS, "forestall-controller")
            assert stored is not None and stored["spec"]["leaseTransitions"] >= 1
        finally:
            for r in replicas.values():
                r[2].set()
            await asyncio.gather(*tasks.values())
            for r in replicas.values():
                r[3].close()
        assert api.rejected == []


async def test_a_crashed_leader_is_replaced_only_after_the_lease_duration() -> None:
    clock = clock_mod.FakeClock()
    async with FakeKubeApi(clock=clock) as api:
        clients = [kube_api_mod.client_for(api.url) for _ in range(2)]
        a, b = (
            lease.LeaseElector(c, name="forestall-controller", namespace=NS, identity=i, clock=clock, **LEASE)
            for c, i in zip(clients, "ab", strict=True)
        )
        assert await asyncio.to_thread(a.try_acquire_or_renew)
        assert not await asyncio.to_thread(b.try_acquire_or_renew)
        clock.advance(5.0)  # a stopped renewing (crashed), but its lease still holds
        assert not await asyncio.to_thread(b.try_acquire_or_renew)
        clock.advance(1.5)
        assert await asyncio.to_thread(b.try_acquire_or_renew)
        assert holder(api) == "b"
        assert not await asyncio.to_thread(a.try_acquire_or_renew)  # the old leader, back, does not steal it
        for c in clients:
            c.close()


async def test_a_leader_that_cannot_renew_steps_down() -> None:
    clock = clock_mod.FakeClock()
    async with FakeKubeApi(clock=clock) as api:
        client = kube_api_mod.client_for(api.url)
        a = lease.LeaseElector(
            client, name="forestall-controller", namespace=NS, identity="a", clock=clock, **LEASE
        )
        changes: list[bool] = []
        stop = asyncio.Event()
        task = asyncio.create_task(a.run(stop, changes.append))
        try:
            await eventually(lambda: changes == [True], "leading")
            api.inject_error("PUT", r"/leases/forestall-controller$", 503, times=100)
            await advance_until(
                clock, lambda: changes == [True, False], "stepped down", step_s=1.0, max_steps=10
            )
            assert clock.monotonic() >= LEASE["renew_deadline_s"]
            assert not a.is_leader
        finally:
            stop.set()
            await task
            client.close()


def test_lease_timings_must_be_ordered() -> None:
    with pytest.raises(ValueError, match=r"lease_duration_s > renew_deadline_s > retry_period_s"):
        lease.LeaseElector(None, name="x", namespace=NS, identity="a", lease_duration_s=5, renew_deadline_s=6)


async def test_any_api_error_is_a_failed_attempt_never_the_end_of_the_elector() -> None:
    """Regression: one 503 on the Lease GET ended `run()`; `is_leader` stayed False and nothing restarted it."""
    clock = clock_mod.FakeClock()
    async with FakeKubeApi(clock=clock) as api:
        client = kube_api_mod.client_for(api.url)
        a = lease.LeaseElector(
            client, name="forestall-controller", namespace=NS, identity="a", clock=clock, **LEASE
        )
        changes: list[bool] = []
        stop = asyncio.Event()
        api.inject_error("GET", r"/leases/forestall-controller$", 503, times=2)
        api.inject_error("GET", r"/leases/forestall-controller$", 429, times=1, retry_after_s=1)
        api.inject_error("GET", r"/leases/forestall-controller$", 500, times=1)
        task = asyncio.create_task(a.run(stop, changes.append))
        try:
            await advance_until(clock, lambda: changes == [True], "leading after 4 errors", step_s=1.0)
            assert not task.done()
            assert holder(api) == "a"
            assert len(api.calls("get", "leases")) >= 5
        finally:
            stop.set()
            await task
            client.close()


async def test_a_leader_blocked_on_a_hung_api_server_steps_down_on_a_timer() -> None:
    """Regression: a renew blocked ~70 s before the step-down check ran, while the follower took over at 15 s."""
    clock = clock_mod.FakeClock()
    async with FakeKubeApi(clock=clock) as api:
        client = kube_api_mod.client_for(api.url)
        a = lease.LeaseElector(
            client, name="forestall-controller", namespace=NS, identity="a", clock=clock, **LEASE
        )
        changes: list[bool] = []
        stop = asyncio.Event()
        task = asyncio.create_task(a.run(stop, changes.append))
        try:
            await advance_until(clock, lambda: changes == [True], "leading", step_s=1.0)
            api.inject_hang("*", r"/leases/", times=1)
            await advance_until(clock, lambda: api.hung == 1, "an attempt hangs", step_s=1.0)
            hung_at = clock.monotonic()
            await advance_until(clock, lambda: changes == [True, False], "stepped down", step_s=1.0)
            assert api.hung == 1, "the attempt is still hanging: the step-down did not wait for it"
            assert not a.is_leader
            assert clock.monotonic() - hung_at <= LEASE["renew_deadline_s"] + LEASE["retry_period_s"]
            assert (
                clock.monotonic() - hung_at < LEASE["lease_duration_s"]
            )  # before a follower could take over
            beat = a.heartbeat_s
            await advance_until(clock, lambda: a.heartbeat_s != beat, "the elector keeps turning", step_s=1.0)
            api.release_hangs()
            await advance_until(clock, lambda: changes == [True, False, True], "leading again", step_s=1.0)
        finally:
            stop.set()
            api.release_hangs()
            await task
            client.close()


async def test_the_elector_survives_a_full_outage() -> None:
    clock = clock_mod.FakeClock()
    async with FakeKubeApi(clock=clock) as api:
        client = kube_api_mod.client_for(api.url)
        a = lease.LeaseElector(
            client, name="forestall-controller", namespace=NS, identity="a", clock=clock, **LEASE
        )
        changes: list[bool] = []
        stop = asyncio.Event()
        task = asyncio.create_task(a.run(stop, changes.append))
        try:
            await advance_until(clock, lambda: changes == [True], "leading", step_s=1.0)
            async with api.outage():
                await advance_until(clock, lambda: changes == [True, False], "stepped down", step_s=1.0)
                failed = a.failed_attempts
                await advance_until(clock, lambda: a.failed_attempts > failed + 2, "still trying", step_s=1.0)
                assert not task.done()
            await advance_until(clock, lambda: changes == [True, False, True], "leading again", step_s=1.0)
        finally:
            stop.set()
            await task
            client.close()
