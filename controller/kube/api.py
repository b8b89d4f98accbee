"""The Kubernetes API client seam: configuration, raw JSON calls, retries and error translation.

Every call the controller makes goes through `call()`, which asks the generated client for the raw response
(`_preload_content=False`) and decodes the JSON itself: building the client's model objects costs more CPU
than the whole decision for a policy, and the controller only reads a few fields. Bodies are sent as plain
dicts, which the client passes through unchanged.

Errors are translated here and nowhere else, keeping the client's exception as the cause:

- 409 -> `errors.Conflict` (the object changed since it was read: re-read and retry, or requeue);
- 404 -> `errors.NotFound`;
- 429, 500, 502, 503, 504 and connection failures are temporary: retried with exponential backoff
  (`RETRY_DELAYS_S`), logged as "attempt #2/4 failed; will retry", then `errors.ClusterError`;
- anything else (400, 403, 422...) -> `errors.ClusterError` at once: retrying cannot fix a bad request.

What this module does not do: decide what to call, or cache anything (`informer` does).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
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
    if in_cluster or (in_cluster is None and kubeconfig is None):
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return client.ApiClient(configuration)
        except config.ConfigException:
            if in_cluster:
                raise
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    return client.ApiClient(configuration)


def client_for(host: str) -> client.ApiClient:
    """An `ApiClient` for a plain-HTTP API server URL (tests, `kubectl proxy`)."""
    configuration = client.Configuration()
    configuration.host = host
    return client.ApiClient(configuration)


def translate(exc: kube_exceptions.ApiException) -> errors.ClusterError:
    """The controller's error for a client `ApiException`, with the server's message."""
    message = _message(exc)
    if exc.status == 409:
        return errors.Conflict(message)
    if exc.status == 404:
        return errors.NotFound(message)
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
    for attempt in range(1, attempts + 1):
        try:
            response = fn(*args, _preload_content=False, **kwargs)
            data = response.data
            return json.loads(data) if data else {}
        except kube_exceptions.ApiException as exc:
            if exc.status not in TEMPORARY_STATUSES or attempt == attempts:
                raise translate(exc) from exc
            failure: str = f"{exc.status} {exc.reason}"
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if attempt == attempts:
                raise errors.ClusterError(f"{name}: cannot reach the API server: {exc}") from exc
            failure = f"{type(exc).__name__}: {exc}"
        log.warning("%s: attempt #%d/%d failed (%s); will retry", name, attempt, attempts, failure)
        _wait.wait(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S)) - 1])
    raise AssertionError("unreachable")


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
