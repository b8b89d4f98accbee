"""Leader election on a `coordination.k8s.io/v1` Lease, so two controller replicas can run and one acts.

Why not `kubernetes.leaderelection` (the client's own elector with its `LeaseLock`): its `LeaderElection.run()`
blocks forever in `time.sleep` loops reading `time.time()` directly, so it cannot take the injected clock
that tests and the simulator use (`contract.clock`), has no way to stop or to release the lease on SIGTERM
(a new leader then waits a whole lease duration), calls `sys.exit` on a bad configuration, and builds its
`CoordinationV1Api()` on the process-global default configuration rather than the client we were given. The
algorithm below is the same as client-go's and the client's (same Lease fields, so replicas running either
interoperate):

- no Lease: create it with ourselves as holder (409 AlreadyExists: someone else won);
- a Lease held by another identity: wait until it has not changed for `leaseDurationSeconds` of *our*
  clock (the local observation time, not the remote renewTime, so clock skew between nodes does not matter),
  then take it over with an update carrying the read `resourceVersion` (409: someone else was faster);
- our own Lease: renew `renewTime` every `retry_period_s`; if renewing keeps failing for `renew_deadline_s`,
  stop leading at once (the other replica may take over after the lease duration);
- on stop, release: clear `holderIdentity` and shorten the lease to 1 s, so the other replica takes over
  within a retry period instead of a lease duration (client-go's `ReleaseOnCancel`).

It outlives the API server. Any failure of an attempt (a 5xx, a 429, a timeout, a refused connection, an
unexpected body) is one failed attempt, logged, never the end of `run()`. Each request carries a timeout
(`request_timeout()`: a retry period to connect, half the renew deadline to answer), and `run()` never
waits for an attempt longer than a retry period: a hung attempt counts as failed while its thread finishes
on its own timeout, and no second attempt starts beside it. The step-down is a timer, not a side effect of
an attempt returning: `is_leader` is False as soon as the renew deadline has passed since the start of the
last successful attempt, whatever any thread is doing, and `run()` announces it within a retry period. So a
leader blocked on a hung API server stops acting before a follower can take over (renew deadline < lease
duration).

`heartbeat_s` (monotonic time of the last loop turn) lets `/healthz` see that `run()` is still turning.

Every I/O call blocks and runs on a worker thread; time comes from the injected `Clock`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from kubernetes import client

from contract import clock as clock_mod
from controller import errors
from controller.kube import api

log = logging.getLogger(__name__)

Obj = dict[str, Any]

LEASE_DURATION_S = 15.0
"""How long a Lease holds without renewal (client-go's default): the takeover time after a leader dies."""

RENEW_DEADLINE_S = 10.0
"""A leader that could not renew for this long stops acting: it must stop before another can take over."""

RETRY_PERIOD_S = 2.0
"""How often the leader renews and a follower tries to acquire."""


class LeaseElector:
    """Elect one leader among replicas sharing a Lease name; `is_leader` says whether this one acts."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        name: str,
        namespace: str,
        identity: str,
        clock: clock_mod.Clock = clock_mod.SYSTEM,
        lease_duration_s: float = LEASE_DURATION_S,
        renew_deadline_s: float = RENEW_DEADLINE_S,
        retry_period_s: float = RETRY_PERIOD_S,
    ) -> None:
        if not lease_duration_s > renew_deadline_s > retry_period_s > 0:
            raise ValueError(
                "leader election needs lease_duration_s > renew_deadline_s > retry_period_s > 0, got "
                f"{lease_duration_s} > {renew_deadline_s} > {retry_period_s}: lengthen the lease or shorten the retry"
            )
        self.coordination = client.CoordinationV1Api(api_client)
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.clock = clock
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._leading = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.heartbeat_s: float | None = None
        """Monotonic time of `run()`'s last turn; None before it started."""
        self.failed_attempts = 0
        """Consecutive failed attempts (errors and hangs), for logs and health."""

    @property
    def is_leader(self) -> bool:
        """True while this replica holds the Lease and renewed it within the renew deadline."""
        return self._leading and self.clock.monotonic() - self._last_renew < self.renew_deadline_s

    def request_timeout(self) -> tuple[float, float]:
        """(connect, read) timeout of one Lease request: bounded well inside the renew deadline."""
        return (self.retry_period_s, self.renew_deadline_s / 2)

    def attempt(self) -> tuple[bool, float]:
        """One attempt that never raises (blocking): (holds the Lease, monotonic time it started)."""
        started = self.clock.monotonic()
        try:
            return self.try_acquire_or_renew(), started
        except Exception as exc:  # any failure is a failed attempt, never the end of the elector
            log.warning("lease %s/%s: attempt failed: %s", self.namespace, self.name, exc)
            return False, started

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking): True when this replica holds the Lease afterwards.

        Raises:
            errors.ClusterError: reading the Lease failed (other than 404); `attempt()` catches it.
        """
        now_mono, now = self.clock.monotonic(), self.clock.now()
        timeout = self.request_timeout()
        try:
            lease = api.call(
                self.coordination.read_namespaced_lease,
                self.name,
                self.namespace,
                attempts=1,
                _request_timeout=timeout,
            )
        except errors.NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, acquire=True, transitions=0),
            }
            try:
                api.call(
                    self.coordination.create_namespaced_lease,
                    self.namespace,
                    body,
                    attempts=1,
                    _request_timeout=timeout,
                )
            except errors.ClusterError as exc:
                log.info("lease %s/%s: could not create: %s", self.namespace, self.name, exc)
                return False
            return True
        spec = lease.get("spec", {})
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"), spec.get("acquireTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, now_mono
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and holder != self.identity and self._observed_at + duration > now_mono:
            return False
        ours = holder == self.identity
        new_spec = self._spec(
            now, acquire=not ours, transitions=int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        )
        if ours and spec.get("acquireTime"):
            new_spec["acquireTime"] = spec["acquireTime"]
        lease["spec"] = new_spec
        try:
            api.call(
                self.coordination.replace_namespaced_lease,
                self.name,
                self.namespace,
                lease,
                attempts=1,
                _request_timeout=timeout,
            )
        except errors.ClusterError as exc:
            log.info(
                "lease %s/%s: could not %s: %s",
                self.namespace,
                self.name,
                "renew" if ours else "acquire",
                exc,
            )
            return False
        if not ours:
            log.info("lease %s/%s: %s took over from %r", self.namespace, self.name, self.identity, holder)
        return True

    def release(self) -> None:
        """Give the Lease up (blocking) if we hold it, so another replica takes over at once."""
        if not self.is_leader:
            self._leading = False
            return
        self._leading = False
        timeout = self.request_timeout()
        try:
            lease = api.call(
                self.coordination.read_namespaced_lease,
                self.name,
                self.namespace,
                attempts=1,
                _request_timeout=timeout,
            )
            if lease.get("spec", {}).get("holderIdentity") != self.identity:
                return
            del lease["spec"]["holderIdentity"]
            lease["spec"]["leaseDurationSeconds"] = 1
            lease["spec"]["renewTime"] = api.micro_time(self.clock.now())
            api.call(
                self.coordination.replace_namespaced_lease,
                self.name,
                self.namespace,
                lease,
                attempts=1,
                _request_timeout=timeout,
            )
            log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
        except errors.ClusterError as exc:
            log.warning(
                "lease %s/%s: release failed (the lease will expire): %s", self.namespace, self.name, exc
            )

    async def run(self, stop: asyncio.Event, on_change: Callable[[bool], None] | None = None) -> None:
        """Acquire and renew until `stop` is set, then release. `on_change(is_leader)` on every transition.

        Turns once per retry period whatever the API server does (see the module docstring); raises only
        on cancellation.
        """
        pending: asyncio.Future[tuple[bool, float]] | None = None
        announced = False
        try:
            while not stop.is_set():
                self.heartbeat_s = self.clock.monotonic()
                if pending is None:
                    pending = asyncio.ensure_future(asyncio.to_thread(self.attempt))
                await _first(stop, self.clock.sleep(self.retry_period_s), pending)
                if pending.done():
                    held, started = pending.result()
                    pending = None
                    if held:
                        self.failed_attempts = 0
                        self._last_renew = max(self._last_renew, started)
                        self._leading = True
                    else:
                        self.failed_attempts += 1
                else:
                    self.failed_attempts += 1
                    log.warning(
                        "lease %s/%s: attempt still running after %.0f s; counted as failed",
                        self.namespace,
                        self.name,
                        self.retry_period_s,
                    )
                if self._leading and not self.is_leader:
                    log.warning(
                        "lease %s/%s: could not renew for %.0f s: stepping down",
                        self.namespace,
                        self.name,
                        self.renew_deadline_s,
                    )
                    self._leading = False
                leading = self.is_leader
                if leading != announced:
                    announced = leading
                    self._announce(leading, on_change)
                if pending is None and not stop.is_set():
                    await _first(stop, self.clock.sleep(self.retry_period_s))
        finally:
            if pending is not None:
                pending.cancel()  # the thread finishes on its own request timeout; its answer is not needed
            await asyncio.shield(asyncio.to_thread(self.release))
            if announced and on_change is not None:
                on_change(False)

    def _announce(self, leader: bool, on_change: Callable[[bool], None] | None) -> None:
        log.info(
            "lease %s/%s: %s is %s",
            self.namespace,
            self.name,
            self.identity,
            "leading" if leader else "following",
        )
        if on_change is not None:
            on_change(leader)

    def _spec(self, now: float, *, acquire: bool, transitions: int) -> Obj:
        stamp = api.micro_time(now)
        spec: Obj = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration_s),
            "renewTime": stamp,
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = stamp
        return spec


async def _first(stop: asyncio.Event, *awaitables: Any) -> None:
    """Wait until `stop` is set or any of `awaitables` finishes; cancel the helpers it started, not the rest."""
    stopper = asyncio.ensure_future(stop.wait())
    started = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in awaitables]
    ours = [stopper] + [f for f, a in zip(started, awaitables, strict=True) if f is not a]
    try:
        await asyncio.wait({stopper, *started}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in ours:
            task.cancel()
        await asyncio.gather(*ours, return_exceptions=True)
