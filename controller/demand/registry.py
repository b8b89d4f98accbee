"""The demand input of every policy: one `PolicyDemand` per policy, behind the pipeline's `DemandSource`.

- `PolicyDemand` puts the parts together for one policy: each `read()` gives the history (Prometheus, or
  the signals history when the policy has no Prometheus), the merged signals and one line per problem. The
  Prometheus client is blocking and runs on a thread so the event loop keeps serving.
- The Prometheus URL a policy names is fetched under the controller's identity, from inside the cluster, so
  a policy author could otherwise make the controller call any internal address. `url_refusal()` allows
  only http/https, no credentials in the URL, and, when the controller is configured with an allowlist
  (`forestall controller --prometheus-url`, default the Prometheus Operator's Service only), only URLs under
  one of its entries. A refused URL is missing data (capacity held, `HistoryMissing`), with the reason.
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
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

from controller import decide, pipeline, policy
from controller.demand import balancers, history, prometheus

log = logging.getLogger(__name__)


def url_refusal(url: str, allowed: Sequence[str] | None) -> str | None:
    """Why the controller must not fetch this Prometheus URL (None: it may).

    `allowed` holds URL prefixes (`https://prometheus.monitoring.svc:9090`, optionally with a path); a URL
    is allowed when its scheme, host and port equal an entry's and its path starts with the entry's path
    at a `/` boundary. `None` allows any http/https URL (library and lab use; the controller passes its
    configured list). The message never repeats credentials.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "demand.prometheus.url is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"demand.prometheus.url must be an http or https URL with a host, got scheme {parts.scheme!r}"
    if parts.username is not None or parts.password is not None:
        return "demand.prometheus.url must not carry credentials: remove the user:password@ part"
    if allowed is None:
        return None
    shown = f"{parts.scheme}://{parts.hostname}{f':{port}' if port else ''}{parts.path}"
    for entry in allowed:
        ok = urllib.parse.urlsplit(entry)
        if (ok.scheme, ok.hostname, _port(ok)) != (parts.scheme, parts.hostname, _port(parts)):
            continue
        base = ok.path.rstrip("/")
        if parts.path == base or parts.path.startswith(base + "/") or not base:
            return None
    return (
        f"demand.prometheus.url {shown} is not allowed by the controller's configuration "
        "(forestall controller --prometheus-url): ask the operator to allow it, or use an allowed Prometheus"
    )


def _port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


class PolicyDemand:
    """The demand input of one policy across reconciles: cached Prometheus history and signals history."""

    def __init__(
        self, spec: policy.ScalingPolicySpec, *, allowed_prometheus_urls: Sequence[str] | None = None
    ) -> None:
        self.spec = spec
        self.allowed_prometheus_urls = allowed_prometheus_urls
        prom = spec.demand.prometheus
        fc = spec.forecast
        self.refused_ = None if prom is None else url_refusal(prom.url, allowed_prometheus_urls)
        """Why the policy's Prometheus URL is not fetched (None: it is, or there is none)."""
        self.prometheus_: prometheus.PrometheusHistory | None = (
            None
            if prom is None or self.refused_ is not None
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
        return PolicyDemand(spec, allowed_prometheus_urls=self.allowed_prometheus_urls)

    async def read(
        self,
        now: float,
        *,
        session: aiohttp.ClientSession | None = None,
        balancer_replicas: Sequence[str] = (),
        signals_scheme: str = "http",
    ) -> pipeline.DemandReading:
        """Read the history and the signals, both at once."""
        spec = self.spec
        errors: list[str] = []
        async with asyncio.TaskGroup() as tg:  # both at once; a failure cancels the other
            signals_task = None
            if spec.demand.balancer is not None and session is not None:
                signals_task = tg.create_task(
                    balancers.fetch_signals(
                        session,
                        balancer_replicas,
                        now=now,
                        stale_after_s=spec.demand.stale_after_s,
                        scheme=signals_scheme,
                    )
                )
            prom_task = None
            if self.prometheus_ is not None:
                prom_task = tg.create_task(asyncio.to_thread(self.prometheus_.read, now))
        if spec.demand.balancer is not None and session is None:
            errors.append("no HTTP session to read balancer signals with")
        if self.refused_ is not None:
            errors.append(self.refused_)
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
        if self.prometheus_ is None and self.refused_ is None:
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
        allowed_prometheus_urls: URL prefixes policies may name as their Prometheus (`url_refusal`);
            None allows any http/https URL.
        signals_scheme: "https" when the balancers' admin listeners serve TLS (their `admin_tls_cert`).
        signals_ca_file: CA bundle verifying the balancers' admin certificates (default: the system store).
    """

    def __init__(
        self,
        *,
        balancer_endpoints: EndpointLookup | None = None,
        signals_timeout_s: float = balancers.SIGNALS_TIMEOUT_S,
        allowed_prometheus_urls: Sequence[str] | None = None,
        signals_scheme: str = "http",
        signals_ca_file: Path | None = None,
    ) -> None:
        if signals_scheme not in ("http", "https"):
            raise ValueError(f"signals_scheme must be 'http' or 'https', got {signals_scheme!r}")
        self.signals_scheme = signals_scheme
        self.signals_ca_file = signals_ca_file
        self.balancer_endpoints = balancer_endpoints
        self.allowed_prometheus_urls = allowed_prometheus_urls
        self.signals_timeout_s = signals_timeout_s
        self._policies: dict[tuple[str, str], PolicyDemand] = {}
        self._errors: dict[tuple[str, str], tuple[str, ...]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def read(self, scaling_policy: policy.ScalingPolicy, *, now: float) -> pipeline.DemandReading:
        meta, spec = scaling_policy.metadata, scaling_policy.spec
        key = (meta.namespace, meta.name)
        current = self._policies.get(key)
        pd = (
            PolicyDemand(spec, allowed_prometheus_urls=self.allowed_prometheus_urls)
            if current is None
            else current.for_spec(spec)
        )
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
            self._session = balancers.signals_session(
                timeout_s=self.signals_timeout_s * 2, ca_file=self.signals_ca_file
            )
        reading = await pd.read(
            now,
            session=self._session if lookup_error is None else None,
            balancer_replicas=replicas,
            signals_scheme=self.signals_scheme,
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
