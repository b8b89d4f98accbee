"""The demand input of every policy: one `PolicyDemand` per policy, behind the pipeline's `DemandSource`.

- `PolicyDemand` puts the parts together for one policy: each `read()` gives the history (Prometheus, or
  the signals history when the policy has no Prometheus), the merged signals and one line per problem. The
  Prometheus client is blocking and runs on a thread so the event loop keeps serving.
- `Demands` implements `controller.pipeline.DemandSource` for the Kubernetes loop: one `PolicyDemand` per
  policy, the balancer replicas looked up through a function the kube layer supplies (EndpointSlice
  addresses of the Service), one shared HTTP session, and each policy's latest problems in
  `errors(namespace, name)` (also logged).

What this module does not do: talk to Kubernetes (the caller supplies the replica lookup), forecast
(`controller.forecasting`, called by `controller.pipeline`) or decide.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiohttp

from controller import decide, pipeline, policy
from controller.demand import balancers, history, prometheus

log = logging.getLogger(__name__)


class PolicyDemand:
    """The demand input of one policy across reconciles: cached Prometheus history and signals history."""

    def __init__(self, spec: policy.ScalingPolicySpec) -> None:
        self.spec = spec
        prom = spec.demand.prometheus
        fc = spec.forecast
        self.prometheus_: prometheus.PrometheusHistory | None = (
            None
            if prom is None
            else prometheus.PrometheusHistory(prom.url, prom.query, step_s=fc.step_s, history_s=fc.history_s)
        )
        self.signals_history_ = history.SignalsHistory(step_s=fc.step_s, history_s=fc.history_s)

    def for_spec(self, spec: policy.ScalingPolicySpec) -> PolicyDemand:
        """This object when the demand settings and history grid are unchanged, else a fresh one for `spec`."""
        same_grid = (spec.forecast.step_s, spec.forecast.history_s) == (
            self.spec.forecast.step_s,
            self.spec.forecast.history_s,
        )
        if spec.demand == self.spec.demand and same_grid:
            self.spec = spec
            return self
        self.close()
        return PolicyDemand(spec)

    async def read(
        self,
        now: float,
        *,
        session: aiohttp.ClientSession | None = None,
        balancer_replicas: Sequence[str] = (),
    ) -> pipeline.DemandReading:
        """Read the history and the signals, both at once."""
        spec = self.spec
        errors: list[str] = []
        async with asyncio.TaskGroup() as tg:  # both at once; a failure cancels the other
            signals_task = None
            if spec.demand.balancer is not None and session is not None:
                signals_task = tg.create_task(
                    balancers.fetch_signals(
                        session, balancer_replicas, now=now, stale_after_s=spec.demand.stale_after_s
                    )
                )
            prom_task = None
            if self.prometheus_ is not None:
                prom_task = tg.create_task(asyncio.to_thread(self.prometheus_.read, now))
        if spec.demand.balancer is not None and session is None:
            errors.append("no HTTP session to read balancer signals with")
        demand_history: decide.DemandHistory | None = None
        if prom_task is not None:
            prom_reading = prom_task.result()
            demand_history = prom_reading.history
            if prom_reading.error:
                errors.append(prom_reading.error)
        snapshot = None
        if signals_task is not None:
            sig_reading = signals_task.result()
            snapshot = sig_reading.snapshot
            errors.extend(sig_reading.errors)
        if self.prometheus_ is None:
            if snapshot is not None and not snapshot.unreachable:
                self.signals_history_.add(now, float(snapshot.active_streams + snapshot.admission_queue))
            demand_history = self.signals_history_.history()
        return pipeline.DemandReading(demand_history, snapshot, tuple(errors))

    def close(self) -> None:
        if self.prometheus_ is not None:
            self.prometheus_.close()


EndpointLookup = Callable[[str, str], Sequence[str]]
"""(namespace, service) -> addresses of the Service's ready endpoints (from its EndpointSlices)."""


class Demands:
    """Demand input for every policy the loop reconciles (implements `controller.pipeline.DemandSource`).

    Args:
        balancer_endpoints: looks up a balancer Service's ready endpoint addresses; without it, policies
            that name a balancer get no signals (and `decide()` holds their capacity, `SignalsMissing`).
        signals_timeout_s: per balancer replica.
    """

    def __init__(
        self,
        *,
        balancer_endpoints: EndpointLookup | None = None,
        signals_timeout_s: float = balancers.SIGNALS_TIMEOUT_S,
    ) -> None:
        self.balancer_endpoints = balancer_endpoints
        self.signals_timeout_s = signals_timeout_s
        self._policies: dict[tuple[str, str], PolicyDemand] = {}
        self._errors: dict[tuple[str, str], tuple[str, ...]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        meta, spec = scaling_policy.metadata, scaling_policy.spec
        key = (meta.namespace, meta.name)
        current = self._policies.get(key)
        pd = PolicyDemand(spec) if current is None else current.for_spec(spec)
        self._policies[key] = pd
        replicas: list[str] = []
        lookup_error: str | None = None
        bal = spec.demand.balancer
        if bal is not None:
            namespace = bal.namespace or meta.namespace
            if self.balancer_endpoints is None:
                lookup_error = "no way to find balancer replicas (no EndpointSlice lookup configured)"
            else:
                try:
                    replicas = balancers.replica_addresses(
                        self.balancer_endpoints(namespace, bal.service), bal.port
                    )
                except Exception as exc:  # a lookup failure is missing data, not a crash
                    lookup_error = f"balancer Service {namespace}/{bal.service}: endpoints unavailable: {exc}"
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.signals_timeout_s * 2)
            )
        reading = await pd.read(
            now,
            session=self._session if lookup_error is None else None,
            balancer_replicas=replicas,
        )
        errors = reading.errors if lookup_error is None else (lookup_error, *reading.errors)
        errors = tuple(e for e in errors if e != "no HTTP session to read balancer signals with")
        if errors:
            log.warning("%s/%s: demand input: %s", *key, "; ".join(errors))
        self._errors[key] = errors
        return pipeline.DemandReading(reading.history, reading.signals, errors)

    def errors(self, namespace: str, name: str) -> tuple[str, ...]:
        """The problems of the policy's last read (empty when all its demand data came in)."""
        return self._errors.get((namespace, name), ())

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted policy's caches."""
        pd = self._policies.pop((namespace, name), None)
        if pd is not None:
            pd.close()
        self._errors.pop((namespace, name), None)

    async def close(self) -> None:
        for pd in self._policies.values():
            pd.close()
        self._policies.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
