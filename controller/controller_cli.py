"""`forestall controller`: run the reconcile loop against a Kubernetes API server.

Credentials come from the pod's service account when it runs in a cluster, or a kubeconfig otherwise (as
kubectl: `--kubeconfig`, else `$KUBECONFIG`, else `~/.kube/config`). It watches ScalingPolicies in one
namespace or all, serves Prometheus metrics, `/healthz` and `/readyz` (`controller.health`) on
`--metrics-port`, and with leader election (on by default,
since the manifests run two replicas) only the Lease holder acts. SIGTERM and SIGINT stop it cleanly: the
loop finishes the policy in hand, the Lease is released so the other replica takes over at once, and the
watches are closed. Exit code 0 after a clean stop, 1 when it could not start (no API server, no caches).

What this module does not do: decide or talk to the API itself; it wires `controller.loop` to
`controller.kube`, `controller.demand` and `controller.metrics`. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Declare `forestall controller` and its options."""
    p = subparsers.add_parser(
        "controller",
        help="run the forecast-driven GPU autoscaling controller against Kubernetes",
        description="Watch ScalingPolicies and keep each target's GPU capacity ahead of forecast demand.",
    )
    p.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file; default: the in-cluster service account, else $KUBECONFIG or ~/.kube/config",
    )
    p.add_argument(
        "--context", metavar="NAME", help="kubeconfig context to use; default: its current context"
    )
    p.add_argument(
        "--in-cluster",
        action="store_true",
        help="require the in-cluster service account (fail instead of falling back to a kubeconfig)",
    )
    p.add_argument(
        "--namespace",
        metavar="NS",
        help="watch ScalingPolicies in this namespace only; default: all namespaces (needs cluster-wide RBAC)",
    )
    p.add_argument(
        "--interval-s",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="seconds between full reconcile cycles over all policies (changes are reconciled at once); default 15",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        metavar="PORT",
        help="port serving /metrics, /healthz and /readyz (0 disables); default 8080",
    )
    p.add_argument(
        "--signals-scheme",
        choices=("http", "https"),
        default="http",
        help="scheme for the balancers' /signals: https when their admin listener has admin_tls_cert; default http",
    )
    p.add_argument(
        "--signals-ca-file",
        type=Path,
        metavar="PATH",
        help="CA bundle verifying the balancers' admin certificates (with --signals-scheme https)",
    )
    p.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        metavar="ADDR",
        help="address the metrics server listens on; default 0.0.0.0",
    )
    p.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="elect one acting replica through a coordination.k8s.io/v1 Lease (default on; off for one replica)",
    )
    p.add_argument(
        "--leader-election-id",
        default="forestall-controller",
        metavar="NAME",
        help="name of the Lease the replicas share; default forestall-controller",
    )
    p.add_argument(
        "--leader-election-namespace",
        metavar="NS",
        help="namespace of the Lease; default $POD_NAMESPACE, else --namespace, else forestall-system",
    )
    p.add_argument(
        "--identity",
        metavar="NAME",
        help="this replica's identity in the Lease and Events; default $POD_NAME, else hostname plus a random suffix",
    )
    p.add_argument(
        "--lease-duration-s",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long the Lease holds without renewal (the takeover time after a crash); default 15",
    )
    p.add_argument(
        "--renew-deadline-s",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a leader that cannot renew for this long stops acting; default 10",
    )
    p.add_argument(
        "--retry-period-s",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the leader renews and a follower tries to acquire; default 2",
    )
    p.add_argument(
        "--pod-selector",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="cache only the pods carrying these labels (label your model pod templates with them): in a "
        "large cluster the controller then holds only model pods in memory; default: every pod",
    )
    p.add_argument(
        "--prometheus-url",
        action="append",
        metavar="URL",
        help="a Prometheus URL prefix policies may name in demand.prometheus.url (repeat for several); "
        "the controller fetches it under its own identity, so others are refused; "
        "default: demand.prometheus.url's default, the Prometheus Operator's Service",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="treat every policy as mode dryRun: compute and report (status, events, metrics), change nothing",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log verbosity; default INFO",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; see the module docstring for exit codes."""
    import asyncio
    import logging

    from controller import errors

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_main(args))
    except (errors.ClusterError, OSError, ValueError) as exc:
        logging.getLogger("forestall.controller").error("cannot run the controller: %s", exc)
        return 1
    return 0


async def _main(args: argparse.Namespace) -> None:
    import asyncio
    import signal

    from contract import clock as clock_mod
    from controller import health, loop, metrics, policy
    from controller.demand import registry
    from controller.kube import api, lease

    api_client = api.load_client(
        kubeconfig=args.kubeconfig, context=args.context, in_cluster=True if args.in_cluster else None
    )
    identity = args.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    controller_metrics = metrics.ControllerMetrics()
    elector = None
    if args.leader_election:
        elector = lease.LeaseElector(
            api_client,
            name=args.leader_election_id,
            namespace=args.leader_election_namespace
            or os.environ.get("POD_NAMESPACE")
            or args.namespace
            or "forestall-system",
            identity=identity,
            clock=clock_mod.SYSTEM,
            lease_duration_s=args.lease_duration_s,
            renew_deadline_s=args.renew_deadline_s,
            retry_period_s=args.retry_period_s,
        )
    holder: list[loop.Controller] = []
    demands = registry.Demands(
        balancer_endpoints=lambda ns, svc: holder[0].caches.service_addresses(ns, svc),
        # unless the operator allows others, only the Prometheus a policy gets by default
        allowed_prometheus_urls=args.prometheus_url or [policy.PrometheusDemand.model_fields["url"].default],
        signals_scheme=args.signals_scheme,
        signals_ca_file=args.signals_ca_file,
    )
    controller = loop.Controller(
        api_client,
        demand=demands,
        clock=clock_mod.SYSTEM,
        controller_metrics=controller_metrics,
        namespace=args.namespace,
        interval_s=args.interval_s,
        dry_run=args.dry_run,
        identity=identity,
        elector=elector,
        pod_selector=args.pod_selector,
    )
    holder.append(controller)
    runner = None
    if args.metrics_port:
        app = health.app(
            registry=controller_metrics.registry,
            live=controller.liveness_problems,
            ready=controller.readiness_problems,
        )
        runner = await health.serve(app, host=args.metrics_address, port=args.metrics_port)
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(sig, stop.set)
    try:
        await controller.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await demands.close()
        api_client.close()  # type: ignore[no-untyped-call]
