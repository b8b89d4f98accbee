"""A policy's demand history read from Prometheus: a range query kept on a regular grid, extended incrementally.

`PrometheusHistory` reads the policy's PromQL as a range query at `forecast.stepSeconds` through
`prometheus-api-client`, keeps the series on a regular grid (NaN where Prometheus has no sample) and, after the
first read of `forecast.historySeconds`, queries only the new tail on each cycle (from a few steps before the
newest cached sample, since the last points can still change as late scrapes arrive). Long first reads are
split into chunks under Prometheus' 11,000-points-per-series limit. A failed read keeps the cached history with
its old `fetched_s` and says why in `error`, so `decide()` holds capacity once it is older than
`demand.staleAfterSeconds`.

What this module does not do: forecast (`controller.forecasting`, called by `controller.pipeline`) or ask the
balancers (`controller.demand.balancers`). The Prometheus client is blocking: call `PrometheusHistory.read` on
a thread from async code (`asyncio.to_thread`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from controller import decide, errors

FloatArray = npt.NDArray[np.float64]

MAX_POINTS_PER_QUERY = 10_000
"""Steps per range query; Prometheus refuses more than 11,000 points per series."""

REFETCH_STEPS = 3
"""Steps before the newest cached sample read again each cycle: the tail of a range query is still moving
while scrapes and rule evaluations for it land."""

PROMETHEUS_TIMEOUT_S = 10.0
"""Per HTTP request to Prometheus; a range query over a week at one minute answers in well under a second."""


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
                raise _QueryError(f"query failed: {errors.one_line(str(exc))}") from exc
            except requests.Timeout as exc:
                raise _QueryError(f"no answer within {self.timeout_s:g} s") from exc
            except (requests.RequestException, ValueError) as exc:
                raise _QueryError(f"unreachable: {errors.one_line(str(exc))}") from exc
            except (KeyError, TypeError, AttributeError) as exc:  # the client indexing a body of odd shape
                raise _QueryError(
                    f"unexpected answer to a range query: {errors.one_line(repr(exc))}"
                ) from exc
            if not isinstance(result, list):
                raise _QueryError(f"unexpected answer to a range query: {errors.one_line(repr(result))}")
            if len(result) > 1:
                labels = ", ".join(str(s.get("metric", {}) if isinstance(s, dict) else s) for s in result[:3])
                raise _QueryError(
                    f"the query returned {len(result)} series ({labels}), it must return one: "
                    f"wrap it in sum(...) (query: {self.query})"
                )
            if result:
                self._fill(out, result[0], start=start, lo=lo, hi=hi)
        return out

    def _fill(self, out: FloatArray, series: object, *, start: float, lo: int, hi: int) -> None:
        """Put one matrix series' samples into `out`; an answer of any other shape is a `_QueryError`.

        Prometheus answers a range query with `[{"metric": {...}, "values": [[t, "v"], ...]}]`. A proxy,
        a different server or a bug can answer anything else (a vector's single `value`, a non-numeric
        value, a one-element pair): that is missing data, said clearly, never an exception out of `read()`.
        """
        if not isinstance(series, dict) or not isinstance(series.get("values"), list):
            kind = "an instant vector" if isinstance(series, dict) and "value" in series else "no sample list"
            raise _QueryError(f"unexpected answer to a range query ({kind}): {errors.one_line(repr(series))}")
        for sample in series["values"]:
            try:
                t, v = sample
                when, value = float(t), float(v)
            except (TypeError, ValueError) as exc:
                raise _QueryError(
                    f"unexpected sample {errors.one_line(repr(sample))} in the answer: {exc}"
                ) from exc
            if not math.isfinite(when):
                raise _QueryError(f"unexpected sample time {t!r} in the answer")
            i = round((when - start) / self.step_s)
            if lo <= i < hi:
                out[i] = value if math.isfinite(value) and value >= 0 else np.nan

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


def _utc(unix_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC)
