"""The Kubernetes API client seam: configuration, raw JSON calls, retries and error translation.

Every call the controller makes goes through `call()`, which asks the generated client for the raw response
(`_preload_content=False`) and decodes the JSON itself: building the client's model objects costs more CPU
than the whole decision for a policy, and the controller only reads a few fields. Bodies are sent as plain
dicts, which the client passes through unchanged.

Errors are translated here and nowhere else, keeping the client's exception as the cause:

- 409 -> `errors.Conflict` (the object changed since it was read: re-read and retry, or requeue);
- 404 -> `errors.NotFound`;
- 403 -> `errors.Forbidden` (RBAC does not grant the call);
- 429, 500, 502, 503, 504 and connection failures are temporary: retried with exponential backoff
  (`RETRY_DELAYS_S`), logged as "attempt #2/4 failed; will retry", then `errors.ClusterError`. A 429's
  `Retry-After` is honoured: the retry waits at least that long, and a wait longer than
  `MAX_RETRY_AFTER_WAIT_S` is not spent blocking a worker thread but raised at once as `errors.Throttled`
  carrying it, so the policy's backoff waits instead;
- anything else (400, 403, 422...) -> `errors.ClusterError` at once: retrying cannot fix a bad request.

A client-side rate limit (`rate_limit()`, a token bucket per `ApiClient`, as client-go's QPS/burst) keeps the
controller's own request rate polite whatever the number of policies; `load_client` sets `DEFAULT_QPS` and
`DEFAULT_BURST`. Watches are long-lived and not counted.

What this module does not do: decide what to call, or cache anything (`informer` does).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client import exceptions as kube_exceptions

from controller import errors

log = logging.getLogger(__name__)

Obj = dict[str, Any]

TEMPORARY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses a retry can fix: throttling, an API server restarting or overloaded, a proxy timing out."""

RETRY_DELAYS_S = (0.2, 0.8, 2.0)
"""Backoff before attempts 2, 3 and 4; about 3 s in all, well inside one 15 s reconcile interval."""

REQUEST_TIMEOUT_S = (5.0, 30.0)
"""Connect and read timeouts of one request: a hung API server must not stall the reconcile loop forever."""

MAX_RETRY_AFTER_WAIT_S = 10.0
"""Longest Retry-After a call waits for on its worker thread; longer ones become `errors.Throttled`."""

DEFAULT_QPS = 20.0
"""Sustained requests per second to the API server (controller-runtime's default); a steady cycle over
1,000 policies needs far fewer, since reads come from the watch caches and writes only follow changes."""

DEFAULT_BURST = 40
"""Requests allowed at once above the sustained rate: a scale-up touching a few objects never waits."""

URLLIB3_RETRIES = False
"""urllib3's own retries are off (`Configuration.retries`): by default it silently retries a 429 or 503 that
carries Retry-After, sleeping for however long the server asks on the calling thread, and retries refused
connections; `call()` owns retries, so each is counted, logged and bounded."""

_wait = threading.Event()
"""Never set: `_wait.wait(s)` is an interruptible blocking sleep for the retry backoff on worker threads."""


def load_client(
    *, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool | None = None
) -> client.ApiClient:
    """An `ApiClient` from the in-cluster service account, or a kubeconfig (default `~/.kube/config`).

    `in_cluster=None` tries the service account first and falls back to the kubeconfig, as kubectl does
    inside a pod.
    """
    configuration = client.Configuration()
    configuration.retries = URLLIB3_RETRIES
    if in_cluster or (in_cluster is None and kubeconfig is None):
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return rate_limit(client.ApiClient(configuration), qps=DEFAULT_QPS, burst=DEFAULT_BURST)
        except config.ConfigException:
            if in_cluster:
                raise
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    return rate_limit(client.ApiClient(configuration), qps=DEFAULT_QPS, burst=DEFAULT_BURST)


class TokenBucket:
    """`qps` tokens a second, at most `burst` saved; `take()` blocks the calling (worker) thread until one is
    free. `monotonic` and `sleep` are injectable so a test can drive it without waiting."""

    def __init__(
        self,
        *,
        qps: float,
        burst: int,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"rate limit needs qps > 0 and burst >= 1, got qps={qps} burst={burst}")
        self.qps, self.burst = qps, burst
        self.monotonic, self.sleep = monotonic, sleep
        self._tokens = float(burst)
        self._at = monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take one token; returns the seconds waited."""
        with self._lock:
            now = self.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)
        return wait


def rate_limit(api_client: client.ApiClient, *, qps: float, burst: int) -> client.ApiClient:
    """Limit every `call()` made through `api_client` to `qps` requests a second (bursts of `burst`)."""
    api_client._forestall_limiter = TokenBucket(qps=qps, burst=burst)  # type: ignore[attr-defined]
    return api_client


def client_for(host: str) -> client.ApiClient:
    """An `ApiClient` for a plain-HTTP API server URL (tests, `kubectl proxy`)."""
    configuration = client.Configuration()
    configuration.host = host
    configuration.retries = URLLIB3_RETRIES
    return client.ApiClient(configuration)


def translate(exc: kube_exceptions.ApiException) -> errors.ClusterError:
    """The controller's error for a client `ApiException`, with the server's message."""
    message = _message(exc)
    if exc.status == 409:
        return errors.Conflict(message)
    if exc.status == 404:
        return errors.NotFound(message)
    if exc.status == 403:
        return errors.Forbidden(message)
    if exc.status == 429:
        return errors.Throttled(message, retry_after_s=_retry_after_s(exc) or RETRY_DELAYS_S[-1])
    return errors.ClusterError(message)


def call(
    fn: Callable[..., Any], /, *args: Any, attempts: int = 1 + len(RETRY_DELAYS_S), **kwargs: Any
) -> Obj:
    """Run one client method, return the decoded JSON body; retry temporary failures, translate the rest.

    Raises:
        errors.Conflict: 409.
        errors.NotFound: 404.
        errors.ClusterError: anything else, after the retries for temporary failures.
    """
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
    name = getattr(fn, "__name__", "call")
    limiter: TokenBucket | None = getattr(
        getattr(getattr(fn, "__self__", None), "api_client", None), "_forestall_limiter", None
    )
    for attempt in range(1, attempts + 1):
        delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S)) - 1]
        if limiter is not None:
            limiter.take()
        try:
            response = fn(*args, _preload_content=False, **kwargs)
            data = response.data
            return json.loads(data) if data else {}
        except kube_exceptions.ApiException as exc:
            retry_after = _retry_after_s(exc) if exc.status == 429 else None
            if retry_after is not None and (attempt == attempts or retry_after > MAX_RETRY_AFTER_WAIT_S):
                raise errors.Throttled(_message(exc), retry_after_s=retry_after) from exc
            if exc.status not in TEMPORARY_STATUSES or attempt == attempts:
                raise translate(exc) from exc
            failure: str = f"{exc.status} {exc.reason}"
            delay = max(delay, retry_after or 0.0)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if attempt == attempts:
                raise errors.ClusterError(f"{name}: cannot reach the API server: {exc}") from exc
            failure = f"{type(exc).__name__}: {exc}"
        log.warning("%s: attempt #%d/%d failed (%s); will retry", name, attempt, attempts, failure)
        _wait.wait(delay)
    raise AssertionError("unreachable")


def _retry_after_s(exc: kube_exceptions.ApiException) -> float | None:
    """Seconds of a response's `Retry-After` header (the API server sends whole seconds), or None."""
    value = (exc.headers or {}).get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _message(exc: kube_exceptions.ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        return f"{exc.status} {body.get('reason', exc.reason)}: {body.get('message', '')}".strip()
    except (ValueError, TypeError):
        return f"{exc.status} {exc.reason}"


def parse_time(value: str | None) -> float | None:
    """Unix seconds of a Kubernetes RFC 3339 timestamp (`...Z`, optionally with fractional seconds)."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def micro_time(unix_s: float) -> str:
    """A Kubernetes MicroTime (`2026-11-23T16:07:48.123456Z`), as Leases and events.k8s.io Events want."""
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
