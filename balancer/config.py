"""The balancer's configuration: one pydantic model filled from a file, the environment and flags.

Precedence is defaults < config file (`--config`, YAML or JSON) < environment (`FORESTALL_BALANCER_<FIELD>`,
e.g. `FORESTALL_BALANCER_IDLE_TIMEOUT_S=120`) < command-line flags, so a Deployment can set most things in a
ConfigMap and override one in its env. Every problem becomes a `ConfigError` whose message names the field, the
value received and what is allowed, instead of a traceback.

The backends file is a separate, reloadable document (`backends: [{address, weight, pod, ...}]`); its schema
is `BackendsFile` here so the static discovery, the admin API and the tests validate it the same way.

What this module does not do: read flags (cli.py does) or watch files (discovery.py does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from balancer import errors

ENV_PREFIX = "FORESTALL_BALANCER_"
"""Environment variables named ENV_PREFIX + upper-case field name override the config file."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def parse_host_port(value: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:port`); ValueError naming the value otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:9001, got {value!r}")
    return host.strip("[]"), int(port)


class BackendSpec(_Model):
    """One backend in the backends file or the admin API."""

    address: str
    """`host:port` of the inference server."""

    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Capacity weight: a weight-2 backend (say an H100 beside an L4) takes twice the streams."""

    pod: str | None = None
    """Pod name, when known; reported in signals so the controller can drain the right pod."""

    max_streams: int | None = Field(None, ge=1)
    """Streams it carries at once before new ones wait in the admission queue; None = the config default."""

    drain: bool = False
    """True to drain it: no new streams or sessions, existing ones finish."""

    methods: tuple[str, ...] = ()
    """MCP methods it serves for sessionless requests carrying `Mcp-Method`; empty serves every method."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value)
        return value


class BackendsFile(_Model):
    """The static backends file."""

    backends: list[BackendSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        seen: set[str] = set()
        for backend in self.backends:
            if backend.address in seen:
                raise ValueError(f"backend address {backend.address!r} is listed twice; list each once")
            seen.add(backend.address)
        return self


class BalancerConfig(_Model):
    """Everything `forestall balancer` can be told."""

    listen: str = "127.0.0.1:8080"
    """Where clients connect (host:port)."""

    admin_listen: str | None = "127.0.0.1:8081"
    """Admin listener (signals, metrics, health, drain/weights/reload); None serves none."""

    backends_file: Path | None = None
    """Static backends file (YAML or JSON), reloaded when it changes."""

    backends: list[BackendSpec] = Field(default_factory=list)
    """Backends given inline (tests, embedding); merged before the file's."""

    admin_token_file: Path | None = None
    """File holding the bearer token admin POSTs require; without it admin changes are refused (403)."""

    tls_cert: Path | None = None
    """PEM certificate for the client and admin listeners (with tls_key); None serves plain HTTP."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""

    admin_tls_cert: Path | None = None
    """PEM certificate for the admin listener (with admin_tls_key); None serves it as plain HTTP. Separate from
    tls_cert so client-facing TLS does not lock out the controller and the probes that read /signals."""
    admin_tls_key: Path | None = None
    admin_tls_client_ca: Path | None = None
    """CA bundle; when set, admin clients (the controller) must present a certificate it signed."""

    backend_tls: bool = False
    """Connect to backends with TLS (https/wss)."""
    backend_ca: Path | None = None
    """CA bundle that verifies backend certificates (default: the system store)."""
    backend_cert: Path | None = None
    """Client certificate presented to backends (mutual TLS), with backend_key."""
    backend_key: Path | None = None

    kube_services: list[str] = Field(default_factory=list)
    """`NAMESPACE/SERVICE` whose EndpointSlices list the backends."""
    kube_inference_pools: list[str] = Field(default_factory=list)
    """`NAMESPACE/NAME` of Gateway API Inference Extension InferencePools (`inference.networking.k8s.io/v1`)
    whose selector and target port list the backends (pods are watched directly, as GIE endpoint pickers do)."""
    kube_api_url: str | None = None
    """Kubernetes API URL; None = in-cluster (KUBERNETES_SERVICE_HOST/PORT)."""
    kube_token_file: Path | None = None
    """Bearer token file; None = the service account token."""
    kube_ca_file: Path | None = None
    """CA bundle of the API server; None = the service account CA."""
    kube_port_name: str | None = None
    """EndpointSlice port name to use when a slice lists several; None = the first port."""

    connect_timeout_s: float = Field(5.0, gt=0)
    """TCP (and TLS) connect deadline; a refused or slow connect is retried elsewhere."""
    first_byte_timeout_s: float = Field(60.0, gt=0)
    """Deadline from sending a request to the first byte of its response body (covers prefill)."""
    idle_timeout_s: float = Field(300.0, gt=0)
    """Longest silence allowed from a backend between chunks after the first byte; checked by a sweep once a
    second (IDLE_SWEEP_S), so a stream is cut within a second after the limit."""

    routes: list[str] = Field(default_factory=lambda: ["/v1/", "/mcp"])
    """Path prefixes proxied to backends; anything else gets 404 from the balancer (so a backend's /metrics or
    admin pages are not public). A prefix ending in `/` matches below it; otherwise the exact path and below."""
    mcp_path: str = "/mcp"
    """The MCP Streamable HTTP endpoint: sessions are sealed and a backend 404 ends one only on this path."""
    session_key_file: Path | None = None
    """File with the key(s) sealing MCP session ids, one per line (base64 of 32 bytes; the first seals, all
    open, so keys rotate). Every replica must read the same file (a Secret); None = a random key per process,
    which only works with one replica."""
    max_sessions_per_client: int = Field(256, ge=1)
    """Sessions one client address keeps counted as load; its oldest beyond this are forgotten (still routable,
    being sealed), so one client cannot grow the table without bound."""
    max_sessions: int = Field(100_000, ge=1)
    """Sessions counted in the table at most (memory bound); the oldest beyond are forgotten, still routable."""

    header_timeout_s: float = Field(10.0, gt=0)
    """Deadline for a request's line and headers from its first byte (or the connection's start): trickled
    headers (slowloris) are cut."""
    keepalive_timeout_s: float = Field(75.0, gt=0)
    """An idle keep-alive client connection is closed after this long (as NGINX's default)."""
    max_connections: int = Field(20_000, ge=1)
    """Client connections open at once; more get 503 and are closed (bounds descriptors and memory)."""
    max_connections_per_ip: int = Field(5_000, ge=1)
    """Client connections one peer address may hold open at once; more get 503 and are closed. Behind an
    ingress or gateway every client shares its address: size this for the busiest peer, not for one user."""
    body_timeout_s: float = Field(60.0, gt=0)
    """Deadline for a whole request body, measured while the balancer reads it; slower uploads get 408 and the
    backend is not blamed (a slow upload must not hold a lease and charge a backend with timeouts)."""
    body_idle_timeout_s: float = Field(10.0, gt=0)
    """Longest pause between pieces of a request body."""
    write_timeout_s: float = Field(30.0, gt=0)
    """A client that reads nothing of its response for this long (its socket buffer stays full) is cut, its
    lease released, and the client blamed, not the backend."""
    ws_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1)
    """Largest WebSocket message relayed either way; bigger ends the socket with 1009 (message too big)."""

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=0)
    """Largest request body accepted; larger gets 413 (prompts are KBs, 16 MiB leaves room for images)."""
    retry_buffer_bytes: int = Field(256 * 1024, ge=0)
    """Request bodies up to this size are held so a failed attempt can be retried elsewhere; larger ones are
    streamed through and retried only if the backend refused the connection."""

    max_attempts: int = Field(3, ge=1)
    """Attempts per stream (first try + retries), each on a different backend."""
    retry_budget_ratio: float = Field(0.2, ge=0)
    """Retries allowed per request on average: bounds the extra load retries add during an outage."""
    retry_budget_min: int = Field(10, ge=0)
    """Retries always allowed (a floor on the budget, for low traffic)."""

    consecutive_failures: int = Field(5, ge=1)
    """Failures in a row that eject a backend."""
    base_ejection_s: float = Field(10.0, gt=0)
    """First ejection time; each repeat doubles it."""
    max_ejection_s: float = Field(300.0, gt=0)
    """Cap on the ejection time."""
    max_ejected_fraction: float = Field(0.5, gt=0, le=1)
    """Never eject more than this fraction of backends (a bad deploy must not take everything out)."""

    slow_start_s: float = Field(30.0, ge=0)
    """Longest warm-up ramp for a backend that joins; 0 disables slow start."""
    slow_start_min_samples: int = Field(3, ge=1)
    """Time-to-first-byte samples needed before a warming backend may be declared settled."""
    slow_start_settle_ratio: float = Field(1.5, ge=1)
    """Warm when its TTFB EWMA is within this factor of the ready backends' median TTFB."""

    max_streams_per_backend: int | None = Field(None, ge=1)
    """Streams one weight-1 backend carries before new streams queue (scaled by weight); None = no cap."""
    admission_queue_max: int = Field(1000, ge=0)
    """Streams that may wait for capacity; more get 503 at once."""
    admission_wait_s: float = Field(10.0, ge=0)
    """Longest wait in the admission queue before 503 with Retry-After."""

    session_epsilon: float = Field(0.25, ge=0)
    """Bounded load: a backend takes new sessions only while under (1 + epsilon) x the mean load."""
    session_idle_timeout_s: float = Field(3600.0, gt=0)
    """A session unused this long is forgotten (clients that never send DELETE must not leak entries)."""
    affinity_header: str | None = None
    """Request header whose value pins requests to a backend (consistent hashing with bounded loads)."""
    affinity_cookie: str | None = None
    """Cookie whose value pins requests to a backend, when the header is absent."""

    hotspot_factor: float = Field(1.5, gt=1)
    """A backend is hot when its load exceeds the weighted mean by this factor ..."""
    hotspot_for_s: float = Field(30.0, ge=0)
    """... for this long."""

    scrape_metrics: bool = True
    """Scrape each backend's /metrics (vLLM, SGLang or TGI names) for the queue it reports and to learn its
    concurrency limit (capacity.py). Backends that publish none of those names are left alone."""
    scrape_interval_s: float = Field(2.0, gt=0)
    """Scrape period: short enough to learn a limit within seconds of the first queue; figures older than 3
    periods count as saturated."""

    reload_interval_s: float = Field(1.0, gt=0)
    """How often the backends file is checked for changes."""
    replica: str | None = None
    """This replica's name in signals (default: the pod name from HOSTNAME, else the listen address)."""

    @field_validator("listen", "admin_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @field_validator("kube_services", "kube_inference_pools")
    @classmethod
    def _services(cls, value: list[str]) -> list[str]:
        for item in value:
            ns, sep, name = item.partition("/")
            if not sep or not ns or not name or "/" in name:
                raise ValueError(f"expected NAMESPACE/NAME such as inference/vllm, got {item!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"tls_cert and tls_key go together, got tls_cert={self.tls_cert} and tls_key={self.tls_key}"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if (self.admin_tls_cert is None) != (self.admin_tls_key is None):
            raise ValueError(
                f"admin_tls_cert and admin_tls_key go together, got admin_tls_cert={self.admin_tls_cert} "
                f"and admin_tls_key={self.admin_tls_key}"
            )
        if self.admin_tls_client_ca is not None and self.admin_tls_cert is None:
            raise ValueError("admin_tls_client_ca (mutual TLS) needs admin_tls_cert and admin_tls_key")
        for route in [*self.routes, self.mcp_path]:
            if not route.startswith("/"):
                raise ValueError(f"routes and mcp_path are path prefixes starting with '/', got {route!r}")
        if (self.backend_cert is None) != (self.backend_key is None):
            raise ValueError("backend_cert and backend_key go together; set both or neither")
        if self.base_ejection_s > self.max_ejection_s:
            raise ValueError(
                f"base_ejection_s ({self.base_ejection_s}) must be <= max_ejection_s ({self.max_ejection_s})"
            )
        if not (self.backends or self.backends_file or self.kube_services or self.kube_inference_pools):
            raise ValueError(
                "no backends: give backends_file (--backends-file), kube_services, kube_inference_pools or backends"
            )
        return self


def build(
    *,
    file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BalancerConfig:
    """The configuration from a file, the environment and explicit overrides (flags), validated.

    Raises:
        ConfigError: unreadable file, unknown field or invalid value, naming the field and the value.
    """
    values: dict[str, Any] = {}
    if file is not None:
        loaded = _load_document(file)
        if not isinstance(loaded, dict):
            raise errors.ConfigError(
                f"config file {file} must hold a mapping of settings, got {type(loaded).__name__}"
            )
        values.update(loaded)
    fields = BalancerConfig.model_fields
    for key, raw in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name not in fields:
                raise errors.ConfigError(
                    f"{key} is not a balancer setting; known: {', '.join(sorted(fields))}"
                )
            values[name] = _env_value(raw)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return BalancerConfig.model_validate(values)
    except ValidationError as exc:
        raise errors.ConfigError(describe(exc)) from exc


def load_backends_file(path: Path) -> BackendsFile:
    """Parse and validate a backends file. Raises ConfigError naming the file and the problem."""
    loaded = _load_document(path)
    try:
        return BackendsFile.model_validate(loaded if loaded is not None else {})
    except ValidationError as exc:
        raise errors.ConfigError(f"backends file {path}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """A pydantic error as `field: message (got value)` lines."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {err['msg']}{shown}")
    return "; ".join(parts)


def _load_document(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise errors.ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise errors.ConfigError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc


def _env_value(raw: str) -> Any:
    """Env values are YAML scalars or lists (`true`, `12.5`, `[a/b, c/d]`), else the plain string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
