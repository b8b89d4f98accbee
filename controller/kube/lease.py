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
        self.is_leader = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking): True when this replica holds the Lease afterwards."""
        now_mono, now = self.clock.monotonic(), self.clock.now()
        try:
            lease = api.call(self.coordination.read_namespaced_lease, self.name, self.namespace, attempts=1)
        except errors.NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, acquire=True, transitions=0),
            }
            try:
                api.call(self.coordination.create_namespaced_lease, self.namespace, body, attempts=1)
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
            api.call(self.coordination.replace_namespaced_lease, self.name, self.namespace, lease, attempts=1)
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
            return
        self.is_leader = False
        try:
            lease = api.call(self.coordination.read_namespaced_lease, self.name, self.namespace, attempts=1)
            if lease.get("spec", {}).get("holderIdentity") != self.identity:
                return
            del lease["spec"]["holderIdentity"]
            lease["spec"]["leaseDurationSeconds"] = 1
            lease["spec"]["renewTime"] = api.micro_time(self.clock.now())
            api.call(self.coordination.replace_namespaced_lease, self.name, self.namespace, lease, attempts=1)
            log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
        except errors.ClusterError as exc:
            log.warning(
                "lease %s/%s: release failed (the lease will expire): %s", self.namespace, self.name, exc
            )

    async def run(self, stop: asyncio.Event, on_change: Callable[[bool], None] | None = None) -> None:
        """Acquire and renew until `stop` is set, then release. `on_change(is_leader)` on every transition."""
        try:
            while not stop.is_set():
                held = await asyncio.to_thread(self.try_acquire_or_renew)
                now_mono = self.clock.monotonic()
                if held:
                    self._last_renew = now_mono
                    self._set(True, on_change)
                elif self.is_leader and now_mono - self._last_renew >= self.renew_deadline_s:
                    log.warning(
                        "lease %s/%s: could not renew for %.0f s: stepping down",
                        self.namespace,
                        self.name,
                        self.renew_deadline_s,
                    )
                    self._set(False, on_change)
                sleeper = asyncio.ensure_future(self.clock.sleep(self.retry_period_s))
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (sleeper, stopper):
                        task.cancel()
                    await asyncio.gather(sleeper, stopper, return_exceptions=True)
        finally:
            was_leader = self.is_leader
            await asyncio.shield(asyncio.to_thread(self.release))
            if was_leader and on_change is not None:
                on_change(False)

    def _set(self, leader: bool, on_change: Callable[[bool], None] | None) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
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
