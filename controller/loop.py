"""The Kubernetes loop: watch ScalingPolicies, schedule their reconciles, and act only while leading.

What is Kubernetes's stays here (watching, scheduling, leader gating, the error-to-condition mapping); each
policy's reconcile itself is `controller.pipeline.PolicyPipeline`, the same one `forestall demo` and
`forestall simulate` run. One process serves many policies (all namespaces or one). Each policy is reconciled when it changes (a new
`metadata.generation`; status-only updates, including our own, do not count) and every `interval_s`
(default 15 s) in a cycle over all policies, a bounded number at a time (`CONCURRENCY`). A reconcile:

1. parses the policy with `controller.policy.parse` (cached per generation). An invalid policy gets
   `Ready=False`, reason `InvalidSpec`, the pydantic message, and a Warning Event; nothing is done to its
   target, which keeps whatever the last valid plan made it, and the other policies carry on;
2. gets the policy's `Cluster` from the injected factory (`KubeCluster` on the shared watch caches by
   default) and runs its pipeline: cluster state and horizon, demand (the `DemandSource`, `controller.demand`
   in production), forecast, `decide()`, `apply_plan` unless dry-run, and the report (`controller.status`:
   status subresource, Events, metrics). Blocking steps run on worker threads;
3. maps cluster errors: a 409 requeues the policy, a missing target sets `Ready=False` (`TargetNotFound`),
   other API failures `Ready=False` (`ClusterError`); a bug costs that policy that cycle only.

With leader election (`controller.kube.lease`), a replica that does not hold the Lease keeps its caches
warm and does nothing else: no reconcile, no status, no Events. It takes over within a lease duration of the
leader stopping (at once when the leader released the Lease on SIGTERM).

Time comes from an injected `contract.clock.Clock`. Blocking Kubernetes calls run on worker threads.

What this module does not do: talk HTTP to Kubernetes itself (`controller.kube`), reconcile a policy
(`controller.pipeline`), build status text (`controller.status`), or read Prometheus and the balancers
(`controller.demand`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract import clock as clock_mod
from controller import backoff, cluster, decide, errors, metrics, pipeline, policy, status
from controller.kube import cluster as kube_cluster
from controller.kube import finalizing, lease, reporting

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]

INTERVAL_S = 15.0
"""Seconds between full cycles: a quarter of the shortest useful forecast step, and cheap at 1,000 policies."""

CONCURRENCY = 32
"""Policies reconciled at once: enough to overlap API round trips, few enough to keep each one's latency."""

REQUEUE_S = 1.0
"""Delay before a policy that hit a 409 is reconciled again with fresh reads."""

SYNC_TIMEOUT_S = 60.0
"""How long to wait for the first list of every watched resource before giving up at start."""

ELECTOR_STALL_S = 30.0
"""`/healthz` fails when the elector has not turned for this long (it turns every retry period, 2 s)."""

ClusterFactory = Callable[[policy.ScalingPolicy, cluster.Cluster | None], cluster.Cluster]
"""(parsed policy, its cluster so far or None) -> the `Cluster` to reconcile it on. Called on every new
generation, so an implementation can follow the changed policy in place (`KubeCluster.update_policy`)."""


@dataclass
class _Policy:
    """What the loop remembers of one policy between reconciles."""

    key: Key
    generation: int | None = None
    parsed: policy.ScalingPolicy | None = None
    pipeline: pipeline.PolicyPipeline | None = None
    invalid: str | None = None

    @property
    def last_plan(self) -> decide.Plan | None:
        """The plan of the last completed reconcile."""
        last = self.pipeline.last_ if self.pipeline is not None else None
        return last.plan if last is not None else None


@dataclass
class CycleResult:
    """One pass over all policies."""

    reconciled: int = 0
    failed: int = 0
    durations_s: list[float] = field(default_factory=list)


class Controller:
    """Reconciles every ScalingPolicy it watches; see the module docstring."""

    def __init__(
        self,
        api_client: Any,
        *,
        demand: pipeline.DemandSource,
        clock: clock_mod.Clock = clock_mod.SYSTEM,
        controller_metrics: metrics.ControllerMetrics | None = None,
        namespace: str | None = None,
        interval_s: float = INTERVAL_S,
        dry_run: bool = False,
        identity: str = "forestall",
        elector: lease.LeaseElector | None = None,
        decide_fn: pipeline.DecideFn = decide.decide,
        concurrency: int = CONCURRENCY,
        cluster_factory: ClusterFactory | None = None,
        forecasts: pipeline.ForecastFactory = pipeline.policy_forecast,
        pod_selector: str | None = None,
    ) -> None:
        self.api_client = api_client
        self.demand = demand
        self.clock = clock
        self.metrics = controller_metrics if controller_metrics is not None else metrics.ControllerMetrics()
        self.namespace = namespace
        self.interval_s = interval_s
        self.dry_run = dry_run
        self.identity = identity
        self.elector = elector
        self.decide_fn = decide_fn
        self.concurrency = concurrency
        self.reporter = reporting.Reporter(api_client, identity=identity, clock=clock)
        self.caches = kube_cluster.Caches(api_client, namespace=namespace, pod_selector=pod_selector)
        self.policies = reporting.policy_informer(api_client, namespace=namespace, on_change=self._on_policy)
        self.cluster_factory = cluster_factory if cluster_factory is not None else self._kube_cluster
        self.forecasts = forecasts
        self.status = status.StatusReporter(
            self.reporter, objects=self.policies.get, controller_metrics=self.metrics
        )
        self.cycles = 0
        """Full cycles completed (tests wait on it)."""

        self._state: dict[Key, _Policy] = {}
        self._dirty: set[Key] = set()
        self._requeue: set[Key] = set()
        self._requeue_at = 0.0
        """Policies whose reconcile hit a conflict: reconciled again after `REQUEUE_S`, not in a hot loop."""
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        """Set on SIGTERM: the policies not yet started in a cycle are left for the next leader."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.backoff = backoff.Backoff(clock=clock)
        """Per-policy exponential delays after failed reconciles (see `controller.backoff`)."""
        self._backing_off: set[Key] = set()
        self._retry_after: dict[Key, float] = {}
        """A server's Retry-After (429) for a policy's last failure: its next attempt waits at least that."""
        self._elector_task: asyncio.Task[None] | None = None
        self.elector_restarts = 0
        self._started = False

    @property
    def acting(self) -> bool:
        """True when this replica may act: no leader election, or it holds the Lease."""
        return self.elector is None or self.elector.is_leader

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the watches and wait for their first lists."""
        self._loop = asyncio.get_running_loop()
        for inf in (self.policies, *self.caches.all):
            inf.start()
        synced = await asyncio.to_thread(
            lambda: self.policies.wait_synced(SYNC_TIMEOUT_S) and self.caches.wait_synced(SYNC_TIMEOUT_S)
        )
        if not synced:
            raise errors.ClusterError(f"the watch caches did not fill within {SYNC_TIMEOUT_S:g} s")
        self._started = True

    async def close(self) -> None:
        def stop_all() -> None:
            for inf in (self.policies, *self.caches.all):
                inf.stop()

        await asyncio.to_thread(stop_all)

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until `stop` is set (SIGTERM); then let the reconciles in flight finish, and only then
        release the Lease (so the next leader never acts beside one still writing) and stop the watches.

        The elector runs supervised (`backoff.supervise`): if it ever raises or returns early it is logged,
        counted in `elector_restarts` and started again, and `/healthz` reports it meanwhile.
        """
        self._stopping = stop
        await self.start()
        elector_stop = asyncio.Event()
        if self.elector is not None:
            elector = self.elector
            self._elector_task = asyncio.create_task(
                backoff.supervise(
                    "leader elector",
                    lambda: elector.run(elector_stop, self._on_leadership),
                    stop=elector_stop,
                    clock=self.clock,
                    on_restart=self._elector_restarted,
                ),
                name="lease",
            )
        try:
            next_cycle = self.clock.monotonic()
            while not stop.is_set():
                if self._requeue and self.clock.monotonic() >= self._requeue_at:
                    self._dirty |= self._requeue
                    self._requeue.clear()
                self._dirty |= self._due_retries()
                if self.acting:
                    if self.clock.monotonic() >= next_cycle:
                        next_cycle = self.clock.monotonic() + self.interval_s
                        await self.reconcile_all()
                    elif self._dirty:
                        keys, self._dirty = sorted(self._dirty), set()
                        await self._reconcile_many(keys)
                self._wake.clear()
                wake_at = min(next_cycle, self._requeue_at) if self._requeue else next_cycle
                retry_at = self.backoff.next_retry_at()
                if retry_at is not None:
                    wake_at = min(wake_at, retry_at)
                await self._wait(stop, wake_at - self.clock.monotonic())
        finally:
            # Reconciles are awaited above, so none is in flight here: only now may the Lease go.
            elector_stop.set()
            if self._elector_task is not None:
                await self._elector_task
            await self.close()

    def _due_retries(self) -> set[Key]:
        """Policies whose backoff delay has just passed: reconciled now rather than at the next cycle."""
        due = {key for key in self._backing_off if self.backoff.ready(key)}
        self._backing_off -= due
        return due

    def _elector_restarted(self, error: BaseException | None) -> None:
        self.elector_restarts += 1

    # --- health ----------------------------------------------------------------------------------------------

    def liveness_problems(self) -> list[str]:
        """Why this replica needs a restart (empty: it does not); served at `/healthz`."""
        problems = []
        if self.elector is not None and self._elector_task is not None:
            if self._elector_task.done():
                problems.append("leader elector: stopped")
            beat = self.elector.heartbeat_s
            if beat is not None and self.clock.monotonic() - beat > ELECTOR_STALL_S:
                problems.append(
                    f"leader elector: no turn for {self.clock.monotonic() - beat:.0f} s "
                    f"(restarted {self.elector_restarts} times)"
                )
        if self._started:
            for inf in (self.policies, *self.caches.all):
                if not inf.alive():
                    problems.append(f"informer {inf.name}: watch thread stopped")
        return problems

    def readiness_problems(self) -> list[str]:
        """Why this replica is not ready (empty: it is); served at `/readyz`."""
        if self._stopping.is_set():
            return ["shutting down"]
        if not self._started:
            return ["watch caches not filled yet"]
        return [
            f"informer {inf.name}: not synced"
            for inf in (self.policies, *self.caches.all)
            if not inf.synced.is_set()
        ]

    async def _wait(self, stop: asyncio.Event, timeout_s: float) -> None:
        """Until the timeout, a change (policy event, leadership) or stop; a follower waits without timeout."""
        if self._dirty and self.acting:
            return
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(stop.wait()),
        ]
        if self.acting or self._requeue:
            waiters.append(asyncio.ensure_future(self.clock.sleep(max(0.0, timeout_s))))
        elif self.elector is not None:
            # A follower also looks again every retry period: leadership can lapse and come back (a stalled
            # process past its renew deadline) without a transition being announced in between.
            waiters.append(asyncio.ensure_future(self.clock.sleep(self.elector.retry_period_s)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    # --- events from the watch threads ---------------------------------------------------------------------

    def _on_policy(self, kind: str, obj: Obj) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._policy_changed, kind, obj)

    def _policy_changed(self, kind: str, obj: Obj) -> None:
        meta = obj.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if kind == "DELETED":
            self._state.pop(key, None)
            self._dirty.discard(key)
            self.backoff.forget(key)
            self._backing_off.discard(key)
            self.metrics.forget(*key)
            self.reporter.forget(*key)
            forget = getattr(self.demand, "forget", None)
            if forget is not None:
                forget(*key)
            return
        known = self._state.get(key)
        if known is None or known.generation != meta.get("generation"):
            self.backoff.forget(key)  # a new spec deserves a prompt try, whatever the old one did
            self._backing_off.discard(key)
            self._dirty.add(key)
            self._wake.set()

    def _on_leadership(self, leading: bool) -> None:
        if leading:
            self._dirty.update(self._keys())
            self._wake.set()

    # --- reconciling ---------------------------------------------------------------------------------------

    def _keys(self) -> list[Key]:
        return sorted(
            (o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in self.policies.items()
        )

    async def reconcile_all(self) -> CycleResult:
        """One cycle over every policy; returns what it did."""
        self._dirty.clear()
        result = await self._reconcile_many(self._keys())
        self.cycles += 1
        return result

    async def _reconcile_many(self, keys: list[Key]) -> CycleResult:
        """Reconcile `keys`, a bounded number at a time; each one isolated from the others.

        No exception of one policy's reconcile (a bug, a failed error-path status write) leaves its task: the
        TaskGroup would cancel the others and end the cycle, and with it the process. A policy that failed is
        skipped until its backoff delay has passed (`controller.backoff`); a due retry wakes the loop.
        """
        result = CycleResult()
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(key: Key) -> None:
            async with semaphore:
                if not self.acting or self._stopping.is_set():
                    return
                started = self.clock.monotonic()
                try:
                    ok = await self.reconcile(key)
                except Exception:  # reconcile() guards itself; this is the last line, never the TaskGroup
                    log.exception("%s/%s: reconcile failed outside its own error handling", *key)
                    self.metrics.reconcile_errors.labels(*key).inc()
                    ok = False
                took = self.clock.monotonic() - started
                result.durations_s.append(took)
                self.metrics.reconcile_duration.observe(took)
                result.reconciled += 1
                result.failed += 0 if ok else 1
                if ok:
                    self.backoff.succeeded(key)
                else:
                    delay = self.backoff.failed(key, at_least_s=self._retry_after.pop(key, 0.0))
                    self._backing_off.add(key)
                    log.info(
                        "%s/%s: retried in %.0f s (failure #%d)", *key, delay, self.backoff.failures(key)
                    )

        due = [key for key in keys if self.backoff.ready(key)]
        async with asyncio.TaskGroup() as group:
            for key in due:
                group.create_task(one(key))
        return result

    async def reconcile(self, key: Key) -> bool:
        """Reconcile one policy; False when it failed (counted in `reconcile_errors_total`)."""
        obj = self.policies.get(*key)
        if obj is None:
            return True
        known = self._state.setdefault(key, _Policy(key))
        try:
            parsed = self._parse(known, obj)
            if await asyncio.to_thread(self._finalize, known, obj, parsed):
                return True
            if parsed is None:
                await asyncio.to_thread(
                    status.report_invalid,
                    self.reporter,
                    obj,
                    known.invalid or "invalid",
                    now=self.clock.now(),
                )
                return True
            assert known.pipeline is not None
            await known.pipeline.reconcile()
            return True
        except errors.Conflict as exc:
            log.info("%s/%s: conflict, requeued: %s", *key, exc)
            if not self._requeue:
                self._requeue_at = self.clock.monotonic() + REQUEUE_S
            self._requeue.add(key)
            return True
        except errors.NotFound as exc:
            self.metrics.reconcile_errors.labels(*key).inc()
            await self._report_safely(known, obj, "TargetNotFound", str(exc))
            return False
        except errors.ClusterError as exc:
            self.metrics.reconcile_errors.labels(*key).inc()
            log.warning("%s/%s: reconcile failed: %s", *key, exc)
            if isinstance(exc, errors.Throttled):
                self._retry_after[key] = exc.retry_after_s
            reason = exc.reason if isinstance(exc, errors.Refused) else "ClusterError"
            await self._report_safely(known, obj, reason, str(exc))
            return False
        except Exception:  # a bug must cost one policy one cycle, never the whole controller
            self.metrics.reconcile_errors.labels(*key).inc()
            log.exception("%s/%s: reconcile failed unexpectedly", *key)
            return False

    async def _report_safely(self, known: _Policy, obj: Obj, reason: str, message: str) -> None:
        """Report a failed reconcile; a failure to report (the API is what failed) is logged, never raised."""
        try:
            await asyncio.to_thread(
                status.report_failure, self.reporter, obj, reason, message, now=self.clock.now()
            )
        except Exception as exc:
            log.warning("%s/%s: could not report %s: %s", *known.key, reason, exc)

    def _finalize(self, known: _Policy, obj: Obj, parsed: policy.ScalingPolicy | None) -> bool:
        """The finalizer's lifecycle (`controller.kube.finalizing`), blocking; True when the policy is being
        deleted (cleaned up here, nothing else to do).

        An active policy gets the finalizer before anything is acted on; a policy being deleted, or moved to
        dry run, has what it held released and its marks removed, then loses the finalizer.
        """
        meta = obj["metadata"]
        deleting = bool(meta.get("deletionTimestamp"))
        if self.dry_run:
            return deleting  # a --dry-run controller writes nothing but status and Events (and may not)
        dry = parsed is not None and parsed.spec.mode == "dryRun"
        held = finalizing.has_finalizer(obj)
        if deleting or (dry and held):
            if held:
                done = kube_cluster.release_policy(
                    self.api_client, self.caches, namespace=known.key[0], name=known.key[1]
                )
                log.info("%s/%s: %s; released %s", *known.key, "deleted" if deleting else "dry run", done)
                finalizing.set_finalizer(self.api_client, obj, present=False)
            return deleting
        if parsed is not None and not dry and not held:
            finalizing.set_finalizer(self.api_client, obj, present=True)
        return False

    def _parse(self, known: _Policy, obj: Obj) -> policy.ScalingPolicy | None:
        generation = obj["metadata"].get("generation")
        if known.generation == generation and (known.parsed is not None or known.invalid is not None):
            return known.parsed
        known.generation = generation
        try:
            parsed = policy.parse({k: v for k, v in obj.items() if k != "status"})
        except errors.InvalidPolicy as exc:
            known.invalid = str(exc)
            known.parsed = None  # the target keeps what the last valid plan made it
            return None
        known.invalid, known.parsed = None, parsed
        if known.pipeline is None:
            known.pipeline = pipeline.PolicyPipeline(
                parsed,
                cluster=self.cluster_factory(parsed, None),
                demand=self.demand,
                reporter=self.status,
                clock=self.clock,
                offload=asyncio.to_thread,
                decide_fn=self.decide_fn,
                forecasts=self.forecasts,
                dry_run=self.dry_run,
            )
        else:
            known.pipeline.update_policy(parsed, cluster=self.cluster_factory(parsed, known.pipeline.cluster))
        return parsed

    def _kube_cluster(self, parsed: policy.ScalingPolicy, current: cluster.Cluster | None) -> cluster.Cluster:
        """The default `ClusterFactory`: a `KubeCluster` on this controller's watch caches."""
        if isinstance(current, kube_cluster.KubeCluster):
            current.update_policy(parsed)
            return current
        return kube_cluster.KubeCluster(
            parsed, api_client=self.api_client, caches=self.caches, clock=self.clock
        )
