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
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract import clock as clock_mod
from controller import cluster, decide, errors, metrics, pipeline, policy, status
from controller.kube import cluster as kube_cluster
from controller.kube import lease, reporting

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
        self.caches = kube_cluster.Caches(api_client, namespace=namespace)
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

    async def close(self) -> None:
        def stop_all() -> None:
            for inf in (self.policies, *self.caches.all):
                inf.stop()

        await asyncio.to_thread(stop_all)

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until `stop` is set (SIGTERM), then release the Lease and stop the watches."""
        self._stopping = stop
        await self.start()
        elector_task = None
        if self.elector is not None:
            elector_task = asyncio.create_task(self.elector.run(stop, self._on_leadership), name="lease")
        try:
            next_cycle = self.clock.monotonic()
            while not stop.is_set():
                if self._requeue and self.clock.monotonic() >= self._requeue_at:
                    self._dirty |= self._requeue
                    self._requeue.clear()
                if self.acting:
                    if self.clock.monotonic() >= next_cycle:
                        next_cycle = self.clock.monotonic() + self.interval_s
                        await self.reconcile_all()
                    elif self._dirty:
                        keys, self._dirty = sorted(self._dirty), set()
                        await self._reconcile_many(keys)
                self._wake.clear()
                wake_at = min(next_cycle, self._requeue_at) if self._requeue else next_cycle
                await self._wait(stop, wake_at - self.clock.monotonic())
        finally:
            if elector_task is not None:
                stop.set()
                await elector_task
            await self.close()

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
            self.metrics.forget(*key)
            self.reporter.forget(*key)
            forget = getattr(self.demand, "forget", None)
            if forget is not None:
                forget(*key)
            return
        known = self._state.get(key)
        if known is None or known.generation != meta.get("generation"):
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
        result = CycleResult()
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(key: Key) -> None:
            async with semaphore:
                if not self.acting or self._stopping.is_set():
                    return
                started = self.clock.monotonic()
                ok = await self.reconcile(key)
                took = self.clock.monotonic() - started
                result.durations_s.append(took)
                self.metrics.reconcile_duration.observe(took)
                result.reconciled += 1
                result.failed += 0 if ok else 1

        async with asyncio.TaskGroup() as group:
            for key in keys:
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
            await asyncio.to_thread(
                status.report_failure, self.reporter, obj, "TargetNotFound", str(exc), now=self.clock.now()
            )
            return False
        except errors.ClusterError as exc:
            self.metrics.reconcile_errors.labels(*key).inc()
            log.warning("%s/%s: reconcile failed: %s", *key, exc)
            with contextlib.suppress(errors.ClusterError):
                await asyncio.to_thread(
                    status.report_failure, self.reporter, obj, "ClusterError", str(exc), now=self.clock.now()
                )
            return False
        except Exception:  # a bug must cost one policy one cycle, never the whole controller
            self.metrics.reconcile_errors.labels(*key).inc()
            log.exception("%s/%s: reconcile failed unexpectedly", *key)
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
