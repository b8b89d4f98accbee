"""`forestall balancer`: run the stream balancer.

    forestall balancer --listen 127.0.0.1:8080 --admin-listen 127.0.0.1:8081 --backends-file backends.yaml \
        [--admin-token-file F] [--tls-cert C --tls-key K [--tls-client-ca CA]] [--kube-service NS/NAME ...] \
        [--admin-tls-cert C --admin-tls-key K [--admin-tls-client-ca CA]] [--session-key-file F] \
        [--config balancer.yaml] [--set FIELD=VALUE ...]

Every setting of `balancer.config.BalancerConfig` can come from the config file, from the environment
(`FORESTALL_BALANCER_<FIELD>`) or from `--set FIELD=VALUE`; the common ones have their own flags. An invalid
configuration exits with status 2 and a message naming the field. SIGTERM/SIGINT stop accepting, let open
streams finish for up to `--shutdown-grace-s`, then exit 0. uvloop is used when installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

SHUTDOWN_GRACE_S = 30.0
"""Default time open streams get to finish on shutdown; below Kubernetes' 30 s termination grace by design
when paired with a preStop sleep, so pods are drained before SIGKILL."""


def add_parser(subparsers: Any) -> None:
    """Register `forestall balancer`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "balancer",
        help="run the least-loaded stream balancer",
        description="Least-loaded stream proxy for GPU inference (SSE/chunked, WebSocket) and MCP sessions.",
    )
    p.add_argument("--config", type=Path, help="config file (YAML/JSON) with BalancerConfig fields")
    p.add_argument("--listen", help="client listener host:port (default 127.0.0.1:8080)")
    p.add_argument(
        "--admin-listen", help="admin listener host:port for signals/metrics/drain (default 127.0.0.1:8081)"
    )
    p.add_argument("--backends-file", type=Path, help="static backends file (YAML/JSON), reloaded on change")
    p.add_argument("--admin-token-file", type=Path, help="file with the bearer token admin POSTs require")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate for the listeners")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="CA bundle: require client certificates (mutual TLS)")
    p.add_argument(
        "--admin-tls-cert",
        type=Path,
        help="PEM certificate for the admin listener (separate from --tls-cert)",
    )
    p.add_argument("--admin-tls-key", type=Path, help="PEM private key for --admin-tls-cert")
    p.add_argument(
        "--admin-tls-client-ca",
        type=Path,
        help="CA bundle: require client certificates on the admin listener",
    )
    p.add_argument(
        "--session-key-file",
        type=Path,
        help="key(s) sealing MCP session ids, shared by every replica (base64 of 32 bytes per line)",
    )
    p.add_argument("--backend-tls", action="store_true", default=None, help="connect to backends with TLS")
    p.add_argument("--backend-ca", type=Path, help="CA bundle verifying backend certificates")
    p.add_argument("--backend-cert", type=Path, help="client certificate for backends (mutual TLS)")
    p.add_argument("--backend-key", type=Path, help="private key for --backend-cert")
    p.add_argument(
        "--kube-service",
        action="append",
        dest="kube_services",
        metavar="NS/NAME",
        help="watch this Service's EndpointSlices (repeatable)",
    )
    p.add_argument("--kube-api-url", help="Kubernetes API URL (default: in-cluster)")
    p.add_argument(
        "--max-streams-per-backend", type=int, help="streams per weight-1 backend before new ones queue"
    )
    p.add_argument(
        "--session-epsilon", type=float, help="bounded-load epsilon for sessions/affinity (default 0.25)"
    )
    p.add_argument(
        "--affinity-header", help="pin requests by this header (consistent hashing, bounded loads)"
    )
    p.add_argument("--affinity-cookie", help="pin requests by this cookie")
    p.add_argument(
        "--scrape-metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read each backend's /metrics (vLLM, SGLang, TGI) for its queue and concurrency limit (default on)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other config field (repeatable)",
    )
    p.add_argument(
        "--shutdown-grace-s", type=float, default=SHUTDOWN_GRACE_S, help="time open streams get on shutdown"
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.set_defaults(func=run)


FLAG_FIELDS = (
    "listen",
    "admin_listen",
    "backends_file",
    "admin_token_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "admin_tls_cert",
    "admin_tls_key",
    "admin_tls_client_ca",
    "session_key_file",
    "backend_tls",
    "backend_ca",
    "backend_cert",
    "backend_key",
    "kube_services",
    "kube_api_url",
    "max_streams_per_backend",
    "session_epsilon",
    "affinity_header",
    "affinity_cookie",
    "scrape_metrics",
)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Flag values as config overrides; `--set` values are parsed as YAML scalars. ValueError on bad --set."""
    import yaml

    out: dict[str, Any] = {name: getattr(args, name) for name in FLAG_FIELDS}
    for item in args.set:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        out[field.strip().replace("-", "_")] = yaml.safe_load(raw)
    return out


def run(args: argparse.Namespace) -> int:
    """Build the configuration, then serve until SIGTERM/SIGINT."""
    return serve(
        "forestall balancer",
        args,
        overrides=lambda: overrides_from(args),
        main=lambda config: _main(config, grace_s=args.shutdown_grace_s),
    )


def serve(
    command: str,
    args: argparse.Namespace,
    *,
    overrides: Callable[[], dict[str, Any]],
    main: Callable[[Any], Coroutine[Any, Any, None]],
) -> int:
    """Log at `--log-level`, build the configuration (file, then `overrides()` from the flags), run `main(config)` on uvloop when
    installed; exit 2 with `command`'s name on an invalid configuration. Shared by the balancer and the picker.
    """
    import asyncio
    import logging

    from balancer import config as config_mod
    from balancer.errors import ConfigError

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_mod.build(file=args.config, overrides=overrides())
    except (ConfigError, ValueError) as exc:
        print(f"{command}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(main(config))
    except ConfigError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    return 0


async def _main(config: Any, *, grace_s: float) -> None:
    import asyncio
    import logging
    import signal

    from balancer import app as app_mod

    served = await app_mod.serve(config, shutdown_grace_s=grace_s)
    logging.getLogger("balancer").info(
        "balancer listening on port %d, admin on port %s", served.port, served.admin_port
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await served.close()
