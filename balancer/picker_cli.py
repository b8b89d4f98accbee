"""`forestall picker`: serve the Gateway API Inference Extension endpoint-picker protocol (Envoy ext_proc).

    forestall picker --listen 127.0.0.1:9002 --admin-listen 127.0.0.1:8081 \
        (--backends-file backends.yaml | --kube-inference-pool NS/NAME | --kube-service NS/NAME) \
        [--fallbacks 2] [--config picker.yaml] [--set FIELD=VALUE ...]

The configuration is `forestall balancer`'s (`balancer.config.BalancerConfig`: file, `FORESTALL_BALANCER_*`
environment, `--set`), read the same way; `--listen` is the gRPC (ext_proc) address here. An invalid
configuration exits with status 2 naming the field. SIGTERM/SIGINT stop taking new requests and give open
ext_proc streams `--shutdown-grace-s` to end (their leases end with them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from balancer import cli as balancer_cli

FALLBACKS = 2
"""Default fallback endpoints after the pick (mirrors extproc.FALLBACKS without importing grpc for --help)."""


def add_parser(subparsers: Any) -> None:
    """Register `forestall picker`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "picker",
        help="serve the gateway endpoint-picker protocol (Envoy ext_proc) from the balancer's picking core",
        description="Gateway API Inference Extension endpoint picker: Envoy ext_proc over gRPC.",
    )
    p.add_argument("--config", type=Path, help="config file (YAML/JSON) with BalancerConfig fields")
    p.add_argument("--listen", help="ext_proc gRPC listener host:port (default 127.0.0.1:8080)")
    p.add_argument("--admin-listen", help="admin listener host:port for signals/metrics/drain")
    p.add_argument("--backends-file", type=Path, help="static backends file (YAML/JSON), reloaded on change")
    p.add_argument("--admin-token-file", type=Path, help="file with the bearer token admin POSTs require")
    p.add_argument(
        "--kube-service",
        action="append",
        dest="kube_services",
        metavar="NS/NAME",
        help="watch this Service's EndpointSlices (repeatable)",
    )
    p.add_argument(
        "--kube-inference-pool",
        action="append",
        dest="kube_inference_pools",
        metavar="NS/NAME",
        help="watch this InferencePool's selector, target port and pods (repeatable)",
    )
    p.add_argument("--kube-api-url", help="Kubernetes API URL (default: in-cluster)")
    p.add_argument(
        "--max-streams-per-backend", type=int, help="streams per weight-1 backend before new ones queue"
    )
    p.add_argument("--session-epsilon", type=float, help="bounded-load epsilon for sessions/affinity")
    p.add_argument(
        "--affinity-header", help="pin requests by this header (consistent hashing, bounded loads)"
    )
    p.add_argument("--affinity-cookie", help="pin requests by this cookie")
    p.add_argument(
        "--scrape-metrics", action="store_true", default=None, help="merge vLLM queue figures from /metrics"
    )
    p.add_argument(
        "--fallbacks",
        type=int,
        default=FALLBACKS,
        help=f"fallback endpoints listed after the pick, for the gateway's retries (default {FALLBACKS})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other config field (repeatable)",
    )
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=balancer_cli.SHUTDOWN_GRACE_S,
        help="time open streams get on shutdown",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    # Balancer flags that have no meaning for a picker (no client listener TLS, no backend connections).
    p.set_defaults(
        func=run,
        tls_cert=None,
        tls_key=None,
        tls_client_ca=None,
        backend_tls=None,
        backend_ca=None,
        backend_cert=None,
        backend_key=None,
    )


def run(args: argparse.Namespace) -> int:
    """Build the configuration, then serve until SIGTERM/SIGINT."""
    try:
        import grpc  # noqa: F401  (only to say what is missing before anything starts)
    except ImportError:
        print("forestall picker needs the gateway extra: pip install 'forestall[gateway]'", file=sys.stderr)
        return 2
    if args.fallbacks < 0:
        print(f"forestall picker: --fallbacks must be >= 0, got {args.fallbacks}", file=sys.stderr)
        return 2

    def overrides() -> dict[str, Any]:
        return {**balancer_cli.overrides_from(args), "kube_inference_pools": args.kube_inference_pools}

    return balancer_cli.serve(
        "forestall picker",
        args,
        overrides=overrides,
        main=lambda config: _main(config, grace_s=args.shutdown_grace_s, fallbacks=args.fallbacks),
    )


async def _main(config: Any, *, grace_s: float, fallbacks: int) -> None:
    import asyncio
    import logging
    import signal

    from balancer import picker

    served = await picker.serve(config, fallbacks=fallbacks)
    logging.getLogger("balancer").info(
        "picker serving ext_proc on port %d, admin on port %s", served.port, served.admin_port
    )
    print(f"picker listening on {served.port} admin {served.admin_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await served.close(grace_s)
