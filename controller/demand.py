"""Demand input for `decide()`: history from Prometheus, live per-pod figures from every balancer replica.

- `PrometheusHistory` reads the policy's PromQL as a range query at `forecast.stepSeconds` through
  `prometheus-api-client`, keeps the series on a regular grid (NaN where Prometheus has no sample) and, after
  the first read of `forecast.historySeconds`, queries only the new tail on each cycle (from a few steps
  before the newest cached sample, since the last points can still change as late scrapes arrive). Long
  first reads are split into chunks under Prometheus' 11,000-points-per-series limit. A failed read keeps
  the cached history with its old `fetched_s` and says why in `error`, so `decide()` holds capacity once
  it is older than `demand.staleAfterSeconds`.
- `fetch_signals` asks every balancer replica for `/signals` concurrently, each under a short timeout, and
  merges the answers with `contract.signals.merge` into a `decide.SignalsSnapshot`. Replicas that do not
  answer, answer garbage, or answer with a report older than `staleAfterSeconds` are named in the snapshot's
  `unreachable` and in `errors`: the sums are then a lower bound, which `decide()` uses to scale up but never
  to scale down. The replica addresses come from the balancer Service's EndpointSlices (the kube module
  lists them; `replica_addresses` formats them).
- `SignalsHistory` records the signals' demand per step, the history of a policy without Prometheus.
- `Demands` is the loop's `DemandSource` (`controller.loop`): one `PolicyDemand` per policy, the balancer
  replicas looked up through a function the kube layer supplies (EndpointSlice addresses of the Service),
  one shared HTTP session, and each policy's latest problems in `errors(key)` (also logged).
- `PolicyDemand` puts these together for one policy: each `read()` gives the history (with its forecast
  from `controller.forecasting`), the signals, and one line per problem, ready for `decide()`. The blocking
  parts (the Prometheus client, a forecaster's first fit) run on a thread so the event loop keeps serving.

What this module does not do: talk to Kubernetes (the caller supplies the replica addresses), forecast
(`controller.forecasting`) or decide. The Prometheus client is blocking: call `PrometheusHistory.read` on a
thread from async code (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import math
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import pydantic
import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from contract import signals as signals_mod
from controller import decide, forecasting, policy

FloatArray = npt.NDArray[np.float64]
log = logging.getLogger(__name__)

MAX_POINTS_PER_QUERY = 10_000
"""Steps per range query; Prometheus refuses more than 11,000 points per series."""

REFETCH_STEPS = 3
"""Steps before the newest cached sample read again each cycle: the tail of a range query is still moving
while scrapes and rule evaluations for it land."""

PROMETHEUS_TIMEOUT_S = 10.0
"""Per HTTP request to Prometheus; a range query over a week at one minute answers in well under a second."""

SIGNALS_TIMEOUT_S = 2.0
"""Per balancer replica; a replica slower than this is counted as unreachable for the cycle."""

SIGNALS_MAX_BYTES = 4 * 1024 * 1024
"""A `/signals` body larger than this is refused (about 10,000 backends; anything bigger is a fault)."""


@dataclass(frozen=True)
class HistoryReading:
    """The history after a read: the cached series (None before the first success) and what went wrong."""

    history: decide.DemandHistory | None
    error: str | None = None
    queried_points: int = 0
    """Steps asked of Prometheus by this read (the whole window the first time, the tail after)."""


class PrometheusHistory:
    """The demand history of one policy, read from Prometheus and extended incrementally."""

    def __init__(
        self,
        url: str,
        query: str,
        *,
        step_s: float,
        history_s: float,
        timeout_s: float = PROMETHEUS_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.query = query
        self.step_s = step_s
        self.history_s = history_s
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self.timestamps_: FloatArray = np.empty(0)
        self.values_: FloatArray = np.empty(0)
        self.fetched_s_: float | None = None
        self._client: PrometheusConnect | None = None

    def read(self, now: float) -> HistoryReading:
        """Query what is new since the last read (all of `history_s` the first time) and merge it in."""
        step = self.step_s
        end = math.floor(now / step) * step
        first = end - (math.ceil(self.history_s / step) - 1) * step
        if self.timestamps_.size:
            start = max(first, float(self.timestamps_[-1]) - REFETCH_STEPS * step)
        else:
            start = first
        n = round((end - start) / step) + 1
        try:
            new = self._query(start, n)
        except _QueryError as exc:
            return HistoryReading(self._history(), f"Prometheus at {self.url}: {exc}", n)
        self._merge(first, start, new)
        self.fetched_s_ = now
        return HistoryReading(self._history(), None, n)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _query(self, start: float, n: int) -> FloatArray:
        """Values for the `n` steps from `start`, NaN where Prometheus has none."""
        if self._client is None:
            # No client-side retries: the next reconcile is the retry, and a backoff here would stall it.
            self._client = PrometheusConnect(
                url=self.url,
                headers=dict(self.headers),
                retry=Retry(total=0, raise_on_status=False),
                timeout=math.ceil(self.timeout_s),
            )
        out = np.full(n, np.nan)
        for lo in range(0, n, MAX_POINTS_PER_QUERY):
            hi = min(n, lo + MAX_POINTS_PER_QUERY)
            t0, t1 = start + lo * self.step_s, start + (hi - 1) * self.step_s
            try:
                result = self._client.custom_query_range(
                    self.query,
                    start_time=_utc(t0),
                    end_time=_utc(t1),
                    step=f"{self.step_s:g}",
                    params={"timeout": f"{self.timeout_s:g}s"},
                )
            except PrometheusApiClientException as exc:
                raise _QueryError(f"query failed: {_short(str(exc))}") from exc
            except requests.Timeout as exc:
                raise _QueryError(f"no answer within {self.timeout_s:g} s") from exc
            except (requests.RequestException, ValueError) as exc:
                raise _QueryError(f"unreachable: {_short(str(exc))}") from exc
            if not isinstance(result, list):
                raise _QueryError(f"unexpected answer to a range query: {_short(repr(result))}")
            if len(result) > 1:
                labels = ", ".join(str(s.get("metric", {})) for s in result[:3])
                raise _QueryError(
                    f"the query returned {len(result)} series ({labels}), it must return one: "
                    f"wrap it in sum(...) (query: {self.query})"
                )
            for t, v in result[0].get("values", []) if result else []:
                i = round((float(t) - start) / self.step_s)
                if lo <= i < hi:
                    value = float(v)
                    out[i] = value if math.isfinite(value) and value >= 0 else np.nan
        return out

    def _merge(self, first: float, start: float, new: FloatArray) -> None:
        ts, vs = self.timestamps_, self.values_
        keep = (ts >= first - 1e-6) & (ts < start - 1e-6)
        old_ts, old_vs = ts[keep], vs[keep]
        new_ts = start + self.step_s * np.arange(new.size, dtype=np.float64)
        self.timestamps_ = np.concatenate([old_ts, new_ts])
        self.values_ = np.concatenate([old_vs, new])

    def _history(self) -> decide.DemandHistory | None:
        if self.fetched_s_ is None:
            return None
        return decide.DemandHistory(
            step_s=self.step_s, timestamps=self.timestamps_, values=self.values_, fetched_s=self.fetched_s_
        )


class _QueryError(Exception):
    """A range query did not give a usable answer; the message says why."""


@dataclass(frozen=True)
class SignalsReading:
    """The merged signals (None when no replica gave a usable report) and one line per replica that did not."""

    snapshot: decide.SignalsSnapshot | None
    errors: tuple[str, ...] = ()
    replicas: int = 0
    """Replicas asked."""


def signals_session(*, timeout_s: float, ca_file: Path | None = None) -> aiohttp.ClientSession:
    """The HTTP session that reads balancer signals; `ca_file` verifies their admin certificates (https)."""
    ssl_ctx: ssl.SSLContext | bool = True
    if ca_file is not None:
        ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s), connector=aiohttp.TCPConnector(ssl=ssl_ctx)
    )


async def fetch_signals(
    session: aiohttp.ClientSession,
    replicas: Sequence[str],
    *,
    now: float,
    stale_after_s: float,
    timeout_s: float = SIGNALS_TIMEOUT_S,
    path: str = "/signals",
    headers: Mapping[str, str] | None = None,
    scheme: str = "http",
) -> SignalsReading:
    """Ask every replica (`host:port`) for its signals at once and merge the fresh, valid answers.

    `scheme` is "https" when the balancers serve their admin listener with TLS (`admin_tls_cert`); the session
    then carries the CA that verifies them (`Demands(signals_ca_file=...)`).
    """
    if not replicas:
        return SignalsReading(None, ("no balancer replicas found (the Service has no ready endpoints)",), 0)
    answers = await asyncio.gather(
        *(
            _fetch_one(session, r, path=path, timeout_s=timeout_s, headers=headers, scheme=scheme)
            for r in replicas
        )
    )
    reports: list[signals_mod.Signals] = []
    errors: list[str] = []
    bad: list[str] = []
    for replica, answer in zip(replicas, answers, strict=True):
        if isinstance(answer, str):
            errors.append(f"balancer {replica}: {answer}")
            bad.append(replica)
        elif now - answer.time > stale_after_s:
            errors.append(
                f"balancer {replica}: report is {now - answer.time:.0f} s old (stale after {stale_after_s:g} s)"
            )
            bad.append(replica)
        else:
            reports.append(answer)
    if not reports:
        return SignalsReading(None, tuple(errors), len(replicas))
    snapshot = decide.SignalsSnapshot(
        time_s=min(r.time for r in reports),
        backends=signals_mod.merge(reports),
        admission_queue=sum(r.admission_queue for r in reports),
        rejected_streams_total=sum(r.rejected_streams_total for r in reports),
        unreachable=tuple(bad),
    )
    return SignalsReading(snapshot, tuple(errors), len(replicas))


async def _fetch_one(
    session: aiohttp.ClientSession,
    replica: str,
    *,
    path: str,
    timeout_s: float,
    headers: Mapping[str, str] | None,
    scheme: str = "http",
) -> signals_mod.Signals | str:
    """One replica's report, or a sentence saying why there is none."""
    url = f"{scheme}://{replica}{path}"
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                body = await _read_capped(resp)
                if resp.status != 200:
                    return (
                        f"GET {path} answered HTTP {resp.status}: {_short(body.decode('utf-8', 'replace'))}"
                    )
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        return f"unreachable: {_short(str(exc) or type(exc).__name__)}"
    except _TooLarge:
        return f"/signals body larger than {SIGNALS_MAX_BYTES} bytes"
    try:
        return signals_mod.Signals.model_validate_json(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return f"malformed /signals ({exc.error_count()} errors; {where}: {first['msg']})"


class _TooLarge(Exception):
    pass


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > SIGNALS_MAX_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def replica_addresses(ips: Sequence[str], port: int) -> list[str]:
    """`host:port` for each endpoint address of the balancer Service (IPv6 in brackets)."""
    out = []
    for ip in ips:
        try:
            v6 = ipaddress.ip_address(ip).version == 6
        except ValueError:
            v6 = False  # a hostname (EndpointSlice addressType FQDN)
        out.append(f"[{ip}]:{port}" if v6 else f"{ip}:{port}")
    return out


@dataclass
class SignalsHistory:
    """Demand history built from the signals the controller reads (for policies without Prometheus).

    Keeps the largest demand seen in each step, like `max_over_time` would, for `history_s`.
    """

    step_s: float
    history_s: float
    timestamps_: list[float] = field(default_factory=list)
    values_: list[float] = field(default_factory=list)
    fetched_s_: float | None = None

    def add(self, now: float, streams: float) -> None:
        slot = math.floor(now / self.step_s) * self.step_s
        if self.timestamps_ and self.timestamps_[-1] == slot:
            self.values_[-1] = max(self.values_[-1], streams)
        else:
            if self.timestamps_ and slot < self.timestamps_[-1]:
                return  # a clock step back: drop the sample rather than break the order
            keep = math.ceil(self.history_s / self.step_s)
            gap = round((slot - self.timestamps_[-1]) / self.step_s) if self.timestamps_ else 0
            if gap > keep:
                self.timestamps_.clear()
                self.values_.clear()
            elif gap > 1:  # steps without a reading are missing, not zero
                last = self.timestamps_[-1]
                self.timestamps_.extend(last + self.step_s * k for k in range(1, gap))
                self.values_.extend([math.nan] * (gap - 1))
            self.timestamps_.append(slot)
            self.values_.append(streams)
        self.fetched_s_ = now
        excess = len(self.timestamps_) - math.ceil(self.history_s / self.step_s)
        if excess > 0:
            del self.timestamps_[:excess]
            del self.values_[:excess]

    def history(self) -> decide.DemandHistory | None:
        if not self.timestamps_:
            return None
        return decide.DemandHistory(
            step_s=self.step_s,
            timestamps=np.asarray(self.timestamps_, dtype=np.float64),
            values=np.asarray(self.values_, dtype=np.float64),
            fetched_s=self.fetched_s_,
        )


@dataclass(frozen=True)
class DemandReading:
    """What one reconcile knows about a policy's demand: inputs for `decide()` and what went wrong."""

    history: decide.DemandHistory | None
    """The demand history carrying its forecast (None before the first successful read)."""

    signals: decide.SignalsSnapshot | None
    errors: tuple[str, ...] = ()
    """One sentence per problem (Prometheus, a balancer replica, the forecast), for logs and conditions."""


class PolicyDemand:
    """The demand input of one policy across reconciles: cached history, forecaster, signals history."""

    def __init__(self, spec: policy.ScalingPolicySpec, *, refit_every_s: float = 3600.0) -> None:
        self.spec = spec
        self.refit_every_s = refit_every_s
        prom = spec.demand.prometheus
        fc = spec.forecast
        self.prometheus_: PrometheusHistory | None = (
            None
            if prom is None
            else PrometheusHistory(prom.url, prom.query, step_s=fc.step_s, history_s=fc.history_s)
        )
        self.signals_history_ = SignalsHistory(step_s=fc.step_s, history_s=fc.history_s)
        self.forecast_ = forecasting.PolicyForecast(fc, refit_every_s=refit_every_s)

    def for_spec(self, spec: policy.ScalingPolicySpec) -> PolicyDemand:
        """This object when the demand and forecast settings are unchanged, else a fresh one for `spec`."""
        if spec.demand == self.spec.demand and spec.forecast == self.spec.forecast:
            self.spec = spec
            return self
        self.close()
        return PolicyDemand(spec, refit_every_s=self.refit_every_s)

    async def read(
        self,
        now: float,
        *,
        horizon_s: float,
        session: aiohttp.ClientSession | None = None,
        balancer_replicas: Sequence[str] = (),
        signals_scheme: str = "http",
    ) -> DemandReading:
        """Read history and signals (both at once), forecast the peak over `horizon_s` (`decide.horizon_s`)."""
        spec = self.spec
        errors: list[str] = []
        sig_reading: SignalsReading | None = None
        prom_reading: HistoryReading | None = None
        async with asyncio.TaskGroup() as tg:  # both at once; a failure cancels the other
            signals_task = None
            if spec.demand.balancer is not None and session is not None:
                signals_task = tg.create_task(
                    fetch_signals(
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
        history: decide.DemandHistory | None = None
        if prom_task is not None:
            prom_reading = prom_task.result()
            history = prom_reading.history
            if prom_reading.error:
                errors.append(prom_reading.error)
        if signals_task is not None:
            sig_reading = signals_task.result()
        snapshot = None
        if sig_reading is not None:
            snapshot = sig_reading.snapshot
            errors.extend(sig_reading.errors)
        if self.prometheus_ is None:
            if snapshot is not None and not snapshot.unreachable:
                self.signals_history_.add(now, float(snapshot.active_streams + snapshot.admission_queue))
            history = self.signals_history_.history()
        if history is not None:
            pf = self.forecast_
            peak = await asyncio.to_thread(
                pf.peak,
                history.timestamps,
                history.values,
                now=now,
                horizon_s=horizon_s,
            )
            if peak is None and pf.error_:
                errors.append(pf.error_)
            history = forecasting.with_forecast(history, peak)
        return DemandReading(history, snapshot, tuple(errors))

    def close(self) -> None:
        if self.prometheus_ is not None:
            self.prometheus_.close()


EndpointLookup = Callable[[str, str], Sequence[str]]
"""(namespace, service) -> addresses of the Service's ready endpoints (from its EndpointSlices)."""


class Demands:
    """Demand input for every policy the loop reconciles (implements `controller.loop.DemandSource`).

    Args:
        balancer_endpoints: looks up a balancer Service's ready endpoint addresses; without it, policies
            that name a balancer get no signals (and `decide()` holds their capacity, `SignalsMissing`).
        signals_timeout_s: per balancer replica.
        signals_scheme: "https" when the balancers' admin listeners serve TLS (their `admin_tls_cert`).
        signals_ca_file: CA bundle verifying the balancers' admin certificates (default: the system store).
    """

    def __init__(
        self,
        *,
        balancer_endpoints: EndpointLookup | None = None,
        signals_timeout_s: float = SIGNALS_TIMEOUT_S,
        refit_every_s: float = 3600.0,
        signals_scheme: str = "http",
        signals_ca_file: Path | None = None,
    ) -> None:
        if signals_scheme not in ("http", "https"):
            raise ValueError(f"signals_scheme must be 'http' or 'https', got {signals_scheme!r}")
        self.balancer_endpoints = balancer_endpoints
        self.signals_timeout_s = signals_timeout_s
        self.signals_scheme = signals_scheme
        self.signals_ca_file = signals_ca_file
        self.refit_every_s = refit_every_s
        self._policies: dict[tuple[str, str], PolicyDemand] = {}
        self._errors: dict[tuple[str, str], tuple[str, ...]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def read(
        self, scaling_policy: policy.ScalingPolicy, *, now: float, horizon_s: float
    ) -> tuple[decide.DemandHistory | None, decide.SignalsSnapshot | None]:
        meta, spec = scaling_policy.metadata, scaling_policy.spec
        key = (meta.namespace, meta.name)
        current = self._policies.get(key)
        pd = (
            PolicyDemand(spec, refit_every_s=self.refit_every_s)
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
                    replicas = replica_addresses(self.balancer_endpoints(namespace, bal.service), bal.port)
                except Exception as exc:  # a lookup failure is missing data, not a crash
                    lookup_error = f"balancer Service {namespace}/{bal.service}: endpoints unavailable: {exc}"
        if self._session is None:
            self._session = signals_session(
                timeout_s=self.signals_timeout_s * 2, ca_file=self.signals_ca_file
            )
        reading = await pd.read(
            now,
            horizon_s=horizon_s,
            session=self._session if lookup_error is None else None,
            balancer_replicas=replicas,
            signals_scheme=self.signals_scheme,
        )
        errors = reading.errors if lookup_error is None else (lookup_error, *reading.errors)
        errors = tuple(e for e in errors if e != "no HTTP session to read balancer signals with")
        if errors:
            log.warning("%s/%s: demand input: %s", *key, "; ".join(errors))
        self._errors[key] = errors
        return reading.history, reading.signals

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


def _utc(unix_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
