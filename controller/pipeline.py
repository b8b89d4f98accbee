"""One policy's reconcile, the only one there is: read the cluster and demand, forecast, decide, apply, report.

The Kubernetes loop (`controller.loop`), `forestall demo` and `forestall simulate` all reconcile a policy by
calling `PolicyPipeline.reconcile()`; what differs between them is behind four seams, injected:

- the `Cluster` (`controller.cluster`): a Kubernetes API server, the simulator's in-memory cluster, or local
  worker processes;
- a `DemandSource`: the demand history and the balancers' live signals (Prometheus and `/signals` over HTTP
  in a cluster, the simulator's own counters);
- a `Reporter`: what is told about the outcome (status subresource, Events and metrics in a cluster; the live
  view in the demo; a record of the plans in the simulator);
- a clock (`contract.clock.Clock`), read once per reconcile for `now`.

A reconcile, in this order:

1. `Cluster.state()`, and the forecast horizon it implies (`decide.horizon_s`: measured lead times);
2. `DemandSource.read(policy, now=...)`: history and signals. A failing source is missing data, which
   `decide()` answers by holding capacity, never a failed reconcile;
3. the forecast of the peak over that horizon (`controller.forecasting.PolicyForecast`, one per policy, kept
   across reconciles and replaced when the policy's forecast settings change);
4. `decide()` with the forecast as an explicit input;
5. unless the policy is `mode: dryRun` or the pipeline runs with the dry-run override, `acting.apply_plan`,
   which returns the typed actions it took;
6. `Reporter.report(Outcome)`, in dry-run too.

Cluster errors (`errors.Conflict`, `errors.NotFound`, `errors.ClusterError`) propagate: what to do about them
(requeue, a condition) is the caller's. Blocking steps (the cluster, the first fit of a forecaster, the report)
go through `offload`: `asyncio.to_thread` where the event loop must keep serving (the Kubernetes loop),
`inline` where the seams never block (the simulator, the demo's local cluster). `run_inline` drives a
reconcile whose seams never suspend without an event loop, which keeps the simulator at thousands of
reconciles per second.

What this module does not do: watch or schedule policies (`controller.loop`), build status or Event text
(`controller.status`), read Prometheus or the balancers (`controller.demand`), or decide (`controller.decide`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from contract import clock as clock_mod
from controller import acting, cluster, decide, forecasting, policy

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class DemandReading:
    """What one reconcile knows about a policy's demand: inputs for `decide()` and what went wrong."""

    history: decide.DemandHistory | None
    """The demand history (None before the first successful read)."""

    signals: decide.SignalsSnapshot | None
    errors: tuple[str, ...] = ()
    """One sentence per problem (Prometheus, a balancer replica, the lookup of replicas), for logs."""


class DemandSource(Protocol):
    """Demand history and the balancers' live signals for one policy, read at `now`."""

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> DemandReading: ...


@dataclass(frozen=True)
class Outcome:
    """Everything one reconcile saw, decided and did: what a `Reporter` reports."""

    policy: policy.ScalingPolicy
    now: float
    horizon_s: float
    state: cluster.ClusterState
    """The snapshot the plan was decided from (before the actions)."""

    plan: decide.Plan
    actions: tuple[acting.Action, ...]
    """What `apply_plan` changed, in order; empty in dry-run."""

    dry_run: bool
    demand_errors: tuple[str, ...] = ()
    """The demand source's and the forecaster's problems this reconcile."""

    @property
    def scaled(self) -> bool:
        """True when the target's replicas were changed."""
        return any(isinstance(a, acting.Scale) for a in self.actions)


class Reporter(Protocol):
    """Tells the world about one reconcile's outcome (status, Events, metrics, a view, a record)."""

    def report(self, outcome: Outcome) -> None: ...


class Offload(Protocol):
    """Runs a blocking call without blocking the caller's event loop (or inline, where nothing blocks)."""

    def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]: ...


async def inline(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """An `Offload` that calls `fn` at once, on the caller's thread."""
    return fn(*args, **kwargs)


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (every seam inline) to its result, without an event loop.

    Raises:
        RuntimeError: the coroutine suspended, i.e. a seam did real asynchronous I/O.
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise RuntimeError("a reconcile run inline suspended: one of its seams awaited real I/O")


DecideFn = Callable[..., decide.Plan]
"""`decide.decide`'s shape (keyword arguments `history`, `forecast`, `signals`, `state`); tests wrap it."""


class PeakForecaster(Protocol):
    """What the pipeline asks of a policy's forecaster (`controller.forecasting.PolicyForecast`)."""

    settings: policy.Forecast
    error_: str | None
    """Why the last `peak` gave None."""
    last_: decide.PeakForecast | None

    def peak(
        self, timestamps: FloatArray, values: FloatArray, *, now: float, horizon_s: float
    ) -> decide.PeakForecast | None: ...


ForecastFactory = Callable[[policy.ScalingPolicy], PeakForecaster]
"""Makes a policy's forecaster (the simulator's refits less often on long runs; tests script theirs)."""


def policy_forecast(scaling_policy: policy.ScalingPolicy) -> PeakForecaster:
    """The default `ForecastFactory`: `forecasting.PolicyForecast` on the policy's forecast settings."""
    return forecasting.PolicyForecast(scaling_policy.spec.forecast)


class PolicyPipeline:
    """The reconcile of one policy across its lifetime; see the module docstring.

    Args:
        scaling_policy: the parsed policy; `update_policy` follows changes.
        dry_run: the process-wide override: decide and report, never apply (a policy's `mode: dryRun` too).
    """

    def __init__(
        self,
        scaling_policy: policy.ScalingPolicy,
        *,
        cluster: cluster.Cluster,
        demand: DemandSource,
        reporter: Reporter,
        clock: clock_mod.Clock,
        offload: Offload = inline,
        decide_fn: DecideFn = decide.decide,
        forecasts: ForecastFactory = policy_forecast,
        dry_run: bool = False,
    ) -> None:
        self.policy = scaling_policy
        self.cluster = cluster
        self.demand = demand
        self.reporter = reporter
        self.clock = clock
        self.offload = offload
        self.decide_fn = decide_fn
        self.forecasts = forecasts
        self.dry_run = dry_run
        self.forecast_ = forecasts(scaling_policy)
        self.last_: Outcome | None = None
        """The last reconcile's outcome (None before the first)."""

    def update_policy(self, scaling_policy: policy.ScalingPolicy, *, cluster: cluster.Cluster) -> None:
        """Follow a changed policy; the forecaster is kept unless the forecast settings changed."""
        if scaling_policy.spec.forecast != self.forecast_.settings:
            self.forecast_ = self.forecasts(scaling_policy)
        self.policy = scaling_policy
        self.cluster = cluster

    async def reconcile(self) -> Outcome:
        """Read, forecast, decide, apply (unless dry-run) and report; see the module docstring."""
        scaling_policy, c = self.policy, self.cluster
        spec = scaling_policy.spec
        state = await self.offload(c.state)
        horizon_s = decide.horizon_s(spec, state)
        now = self.clock.now()
        try:
            reading = await self.demand.read(scaling_policy, now=now)
        except Exception as exc:  # missing data is an input to decide(), never a crash
            meta = scaling_policy.metadata
            log.warning("%s/%s: demand unavailable: %s", meta.namespace, meta.name, exc)
            reading = DemandReading(None, None, (f"demand unavailable: {exc}",))
        history = reading.history
        errors = reading.errors
        peak: decide.PeakForecast | None = None
        if history is not None:
            fc = self.forecast_
            peak = await self.offload(
                fc.peak, history.timestamps, history.values, now=now, horizon_s=horizon_s
            )
            if peak is None and fc.error_:
                errors = (*errors, fc.error_)
        # decide() is pure but runs where blocking work runs: a slow one (thousands of pods) must not stall
        # the event loop, which also renews the leader's Lease.
        plan = await self.offload(
            self.decide_fn, spec, now, history=history, forecast=peak, signals=reading.signals, state=state
        )
        dry = self.dry_run or spec.mode == "dryRun"
        actions: tuple[acting.Action, ...] = ()
        if not dry:
            actions = tuple(await self.offload(acting.apply_plan, c, plan, state, now=now))
        outcome = Outcome(
            policy=scaling_policy,
            now=now,
            horizon_s=horizon_s,
            state=state,
            plan=plan,
            actions=actions,
            dry_run=dry,
            demand_errors=errors,
        )
        await self.offload(self.reporter.report, outcome)
        self.last_ = outcome
        return outcome
