"""The end-to-end scenario of `tests/e2e/test_system.py`: the whole system wired together and driven.

`run_system(tmp, run)` starts, all on 127.0.0.1: the in-test Kubernetes API server with the worker
Deployment, the fake kubelet/ReplicaSet (`e2e_kubelet`), the balancer in process (workers discovered through
EndpointSlices), the controller's metrics endpoint, a real Prometheus scraping the balancer and the
controller every second, and the controller loop (`controller.loop.Controller`, `KubeCluster`,
`controller.demand.registry.Demands`) on the ScalingPolicy built by `policy_object`. `drive()` then runs the load
profile (`e2e_load`), waits for the drop's drains and removals, queries every dashboard panel
(`run_panel_queries`), stops the load and Prometheus and watches the controller hold capacity. Everything
the tests assert on is recorded in a `Run`; nothing here asserts, except bounded waits failing by name.

The constants are the scenario's time compression (see the test module's docstring) and its load shape.

What it does not do: decide pass or fail (the tests do), or run Kubernetes' own controllers beyond the fake
kubelet's ReplicaSet and EndpointSlice duties.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from balancer import app as app_mod
from balancer import config as config_mod
from balancer.runtime import Balancer
from contract import clock as clock_mod
from controller import cluster, decide, loop, metrics
from controller.demand import registry as demand_registry
from controller.kube import api as kube_api_mod
from dashboards import generate, panels
from tests.fakes import e2e_kubelet, e2e_load, kube_api, prometheus
from tests.fakes.balancer_env import start_app

NS = "llm"
WORKERS = "vllm"
"""The worker Deployment and its Service."""
BALANCER_SERVICE = "forestall-balancer"
POLICY = "vllm"
POLICY_QUERY = "sum(forestall_balancer_active_streams)"
"""The policy's demand PromQL: concurrent streams over every backend of the (one) balancer."""

STREAMS_PER_REPLICA = 4
"""Matches the emulated servers' slots: a fifth stream on one replica would wait for a slot."""
MAX_REPLICAS = 10
TOKENS = 40
SECONDS_PER_TOKEN = 0.05
"""A stream lasts about 2 s (40 tokens at 50 ms), so concurrency is about twice the arrival rate."""

BASE_RATE = 1.0
PEAK_RATE = 8.0
"""Streams per second at the low level and at the peak: about 2 and 16 concurrent streams."""
WARM_S, RAMP_S, HOLD_S = 20.0, 30.0, 15.0
DROP_AT_S = WARM_S + RAMP_S + HOLD_S
PROFILE = (
    (0.0, BASE_RATE),
    (WARM_S, BASE_RATE),
    (WARM_S + RAMP_S, PEAK_RATE),
    (DROP_AT_S, PEAK_RATE),
    (DROP_AT_S + 0.01, BASE_RATE),
)
LOAD_UNTIL_S = 400.0
"""The low rate goes on until the run stops it (before the Prometheus outage); this only bounds it."""

STABILIZATION_S = 15.0
STALE_AFTER_S = 5.0
MIN_DRAIN_S = 8.0
"""Replaces `decide.MIN_DRAIN_S` (60 s) for the run (the test fixture patches it); the test module says why."""
OUTAGE_CYCLES = int(STABILIZATION_S + MIN_DRAIN_S + 2)
"""Reconcile cycles (1 s apart) capacity is watched after DemandDataAvailable turned False: longer than a
scale-down would take with data (stabilization window plus the drain), so holding is what the controller chose."""

CLIENT_GONE_REASONS = frozenset({"client_gone", "cancelled"})
"""Balancer failure reasons a client that walks away causes (the load generator abandons one stream)."""


def policy_object(prometheus_url: str, balancer_admin_port: int) -> dict[str, Any]:
    return kube_api.scaling_policy(
        POLICY,
        NS,
        target=WORKERS,
        demand={
            "prometheus": {"url": prometheus_url, "query": POLICY_QUERY},
            "balancer": {"service": BALANCER_SERVICE, "port": balancer_admin_port},
            "staleAfterSeconds": STALE_AFTER_S,
        },
        capacity={"streamsPerReplica": STREAMS_PER_REPLICA, "gpusPerReplica": 1, "gpusPerNode": 16},
        replicas={"min": 1, "max": MAX_REPLICAS},
        forecast={"stepSeconds": 1, "historySeconds": 300, "quantile": 0.95},
        leadTime={"nodeProvisioningSeconds": 4, "podStartSeconds": 1, "modelLoadSeconds": 2},
        scaleDown={
            # one node carries every pod here: whole-node draining would hold them all (see decide.py)
            "wholeNodes": False,
            "stabilizationWindowSeconds": STABILIZATION_S,
            "maxPodsPerMinute": MAX_REPLICAS,
            "drainTimeoutSeconds": STABILIZATION_S,
        },
    )


# --- what the run records ------------------------------------------------------------------------------------


@dataclass
class PanelResult:
    dashboard: str
    panel: str
    expr: str
    instant: bool
    series: int
    points: int
    error: str | None = None


@dataclass
class Run:
    """Everything the tests assert on, recorded during one run of the system."""

    outcomes: e2e_load.Outcomes = field(default_factory=e2e_load.Outcomes)
    peak_streams: int = 0
    needed_replicas: int = 0
    demand_needed_s: float | None = None
    """When the load generator's open streams first needed `needed_replicas`."""
    demand_peak_s: float | None = None
    """When they first reached their maximum."""
    replicas_up_s: float | None = None
    """When the Deployment first asked for `needed_replicas`."""
    replica_history: list[tuple[float, int]] = field(default_factory=list)
    scale_up_notes: list[str] = field(default_factory=list)
    decisions: dict[str, float] = field(default_factory=dict)
    drains_total: float = 0.0
    reconcile_errors_total: float = 0.0
    removed: list[e2e_kubelet.Removal] = field(default_factory=list)
    marked: dict[str, float] = field(default_factory=dict)
    """Pod -> monotonic time its drain mark was first seen."""
    drain_seen_by_balancer: dict[str, bool] = field(default_factory=dict)
    """Pod -> whether the balancer reported its backend draining before the pod was removed."""
    balancer_failures: dict[str, int] = field(default_factory=dict)
    """Failed streams by reason, over every backend the balancer had (sampled on each kubelet poll)."""
    panels: list[PanelResult] = field(default_factory=list)
    policy_range_queries: int = 0
    """Range queries of the policy's PromQL at its 1 s step in Prometheus' query log (the controller's reads)."""
    replicas_at_drop: int = 0
    replicas_after_drop: int = 0
    removed_after_drop: list[str] = field(default_factory=list)
    load_origin_s: float = 0.0
    events: list[str] = field(default_factory=list)
    """`reason: note` of every Event the controller wrote, oldest first (for failure messages)."""
    outage_replicas_before: int = 0
    outage_stopped_s: float = 0.0
    outage_condition: dict[str, Any] = field(default_factory=dict)
    outage_cycles: int = 0
    outage_marked_pods: list[str] = field(default_factory=list)
    outage_replicas_after: int = 0
    demand_data_available_metric: float | None = None
    demand_errors: tuple[str, ...] = ()
    leftover_tasks: list[str] = field(default_factory=list)
    stage_reached: str = "start"

    def summary(self) -> str:
        up = self.replicas_up_s
        lead = (
            f"{self.demand_needed_s - up:.1f} s before demand needed them"
            if up is not None and self.demand_needed_s is not None
            else "never"
        )
        return (
            f"peak {self.peak_streams} streams -> {self.needed_replicas} replicas, asked for {lead}\n"
            f"streams {self.outcomes}\nbalancer failures {self.balancer_failures}\n"
            f"removed after the drop {self.removed_after_drop} ({self.replicas_at_drop} -> "
            f"{self.replicas_after_drop} replicas); all removals: "
            f"{[(r.pod, r.streams_left) for r in self.removed]}\n"
            f"outage: {self.outage_replicas_before} -> {self.outage_replicas_after} replicas over "
            f"{self.outage_cycles} cycles, {self.outage_condition}\n"
            f"panels without data: {[p.panel for p in self.panels if not p.points]}\n{self.history()}"
        )

    def history(self) -> str:
        """Replicas over load time, and the controller's Events, for failure messages."""
        replicas = ", ".join(f"{t - self.load_origin_s:.1f}s:{n}" for t, n in self.replica_history)
        return f"replicas {replicas}\nevents:\n" + "\n".join(self.events)


# --- helpers ------------------------------------------------------------------------------------------------


def controller_metrics_app(registry: CollectorRegistry) -> web.Application:
    """The controller's `/metrics`, as `forestall controller` serves it, for Prometheus to scrape."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


async def wait_for(check: Callable[[], bool], what: str, *, timeout_s: float, step_s: float = 0.1) -> None:
    """Poll `check` (bounded); raise naming `what` when it never holds."""
    for _ in range(max(1, math.ceil(timeout_s / step_s))):
        if check():
            return
        await asyncio.sleep(step_s)
    if not check():
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@contextlib.asynccontextmanager
async def prometheus_in_thread(tmp: Path, scrape_configs: list[dict[str, Any]]) -> AsyncIterator[Any]:
    """`tests.fakes.prometheus.running_prometheus`, entered and left on a thread so the loop keeps serving."""
    cm = prometheus.running_prometheus(tmp, scrape_configs=scrape_configs, scrape_interval_s=1.0)
    server = await asyncio.to_thread(cm.__enter__)
    try:
        yield server
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


def dashboard_targets() -> list[tuple[str, str, str, bool]]:
    """(dashboard, panel, PromQL, instant) of every panel target in the generated JSON Grafana loads."""
    out = []
    for spec in panels.DASHBOARDS:
        data = json.loads((generate.OUT_DIR / spec.filename).read_text())
        for panel in data["panels"]:
            for target in panel.get("targets", []):
                out.append((data["title"], panel["title"], target["expr"], bool(target.get("instant"))))
    assert [t[:3] for t in out] == generate.queries(), "dashboard_targets() must read what queries() reads"
    return out


def run_panel_queries(url: str, *, start_s: float, end_s: float) -> list[PanelResult]:
    """Each target as Grafana runs it: instant at `end_s`, or a range query over the run at a 1 s step."""
    results = []
    for dashboard, panel, expr, instant in dashboard_targets():
        promql = generate.substitute(expr)
        if instant:
            path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": f"{end_s:.3f}"})
        else:
            path = "/api/v1/query_range?" + urllib.parse.urlencode(
                {"query": promql, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": "1"}
            )
        error = None
        series = points = 0
        try:
            with urllib.request.urlopen(url + path, timeout=20) as resp:
                body = json.load(resp)
            result = body["data"]["result"]
            series = len(result)
            points = sum(len(s.get("values", [])) or (1 if "value" in s else 0) for s in result)
        except urllib.error.HTTPError as err:
            with err:
                error = f"HTTP {err.code}: {err.read()[:300]!r}"
        results.append(PanelResult(dashboard, panel, expr, instant, series, points, error))
    return results


def scraped_after(prom: prometheus.PrometheusServer, unix_s: float) -> bool:
    """True once Prometheus holds a balancer and a controller sample newer than `unix_s`."""
    for job in ("balancer", "controller"):
        result = prom.query(f'timestamp(up{{job="{job}"}} == 1)')
        if not result or float(result[0]["value"][1]) <= unix_s:
            return False
    return True


def pod_annotations(api: kube_api.FakeKubeApi) -> dict[str, dict[str, str]]:
    return {
        p["metadata"]["name"]: dict(p["metadata"].get("annotations") or {})
        for p in api.objects("", "pods", NS)
    }


def deployment_replicas(api: kube_api.FakeKubeApi) -> int:
    obj = api.get("apps", "deployments", NS, WORKERS)
    assert obj is not None
    return int(obj["spec"]["replicas"])


def policy_condition(api: kube_api.FakeKubeApi, kind: str) -> dict[str, Any]:
    obj = api.get("forestall.dev", "scalingpolicies", NS, POLICY) or {}
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"namespace": NS, "policy": POLICY, **labels})
    return 0.0 if value is None else value


# --- the run ------------------------------------------------------------------------------------------------


async def run_system(tmp: Path, run: Run) -> None:
    """Start everything, drive the load through its phases, stop Prometheus, record what happened."""
    clock = clock_mod.SYSTEM
    async with kube_api.FakeKubeApi(bookmark_interval_s=1.0) as api:
        api.put(kube_api.deployment(WORKERS, NS, replicas=1))
        kubelet = e2e_kubelet.FakeKubelet(
            api,
            namespace=NS,
            deployment=WORKERS,
            service=WORKERS,
            node_gpus=16,
            emulation=e2e_kubelet.Emulation(
                slots=STREAMS_PER_REPLICA, ttft_s=0.05, seconds_per_token=SECONDS_PER_TOKEN
            ),
        )
        async with kubelet:
            config = config_mod.BalancerConfig(
                listen="127.0.0.1:0",
                admin_listen="127.0.0.1:0",
                kube_services=[f"{NS}/{WORKERS}"],
                kube_api_url=api.url,
                slow_start_s=2.0,
                replica="balancer-0",
            )
            bal = Balancer(config, clock=clock)
            served = await app_mod.serve(
                config,
                clock=clock,
                apps=app_mod.create_apps(config, clock=clock, bal=bal),
                shutdown_grace_s=5.0,
            )
            registry = CollectorRegistry()
            metrics_runner, metrics_address = await start_app(controller_metrics_app(registry))
            try:
                assert served.admin_port is not None
                api.put(e2e_kubelet.service_slice(NS, BALANCER_SERVICE, port=served.admin_port))

                failures: dict[tuple[str, str], int] = {}

                def watch_drains() -> None:
                    """Every kubelet poll: balancer failures, drain marks and whether the balancer saw them."""
                    now = clock.monotonic()
                    draining = {b.pod for b in bal.pool.backends.values() if b.state(now) == "draining"}
                    for b in bal.pool.backends.values():  # removed backends take their counters along
                        for reason, count in b.failed.items():
                            key = (b.address, reason)
                            failures[key] = max(failures.get(key, 0), count)
                    for pod, notes in pod_annotations(api).items():
                        if cluster.DRAIN_ANNOTATION in notes:
                            run.marked.setdefault(pod, now)
                            if pod in draining:
                                run.drain_seen_by_balancer[pod] = True
                            else:
                                run.drain_seen_by_balancer.setdefault(pod, False)

                kubelet.on_poll = watch_drains
                scrape = [
                    {
                        "job_name": "balancer",
                        "static_configs": [{"targets": [f"127.0.0.1:{served.admin_port}"]}],
                    },
                    {"job_name": "controller", "static_configs": [{"targets": [metrics_address]}]},
                ]
                async with prometheus_in_thread(tmp, scrape) as prom:
                    await drive(
                        run, api=api, kubelet=kubelet, bal=bal, served=served, prom=prom, registry=registry
                    )
            finally:
                await metrics_runner.cleanup()
                await served.close()
                for (_, reason), count in failures.items():
                    run.balancer_failures[reason] = run.balancer_failures.get(reason, 0) + count
        run.removed = list(kubelet.removed)
        run.replica_history = list(kubelet.replica_history)


async def drive(
    run: Run,
    *,
    api: kube_api.FakeKubeApi,
    kubelet: e2e_kubelet.FakeKubelet,
    bal: Balancer,
    served: app_mod.Served,
    prom: prometheus.PrometheusServer,
    registry: CollectorRegistry,
) -> None:
    clock = clock_mod.SYSTEM
    assert served.admin_port is not None
    api.put(policy_object(prom.url, served.admin_port))
    client = kube_api_mod.client_for(api.url)
    ctl: loop.Controller | None = None

    def balancer_endpoints(namespace: str, service: str) -> list[str]:
        assert ctl is not None
        return ctl.caches.service_addresses(namespace, service)

    demands = demand_registry.Demands(balancer_endpoints=balancer_endpoints)
    ctl = loop.Controller(
        client,
        demand=demands,
        clock=clock,
        controller_metrics=metrics.ControllerMetrics(registry),
        namespace=NS,
        interval_s=1.0,
        identity="e2e-controller",
    )
    stop = asyncio.Event()
    ctl_task = asyncio.create_task(ctl.run(stop), name="controller")
    started_wall_s = clock.now()
    try:
        await wait_for(lambda: bool(kubelet.ready_pods()), "the first worker pod Ready", timeout_s=30)
        await wait_for(
            lambda: any(b.state(clock.monotonic()) in ("ready", "warming") for b in bal.pool.present()),
            "the balancer to discover the first worker through its EndpointSlice",
            timeout_s=30,
        )
        run.stage_reached = "system up"
        async with e2e_load.LoadGenerator(f"http://127.0.0.1:{served.port}", tokens=TOKENS) as load:
            run.load_origin_s = load.origin_s
            arrivals = asyncio.create_task(load.run(PROFILE, until_s=LOAD_UNTIL_S), name="arrivals")
            try:
                # A reconcile that fails on the API server (a refused status write), so the reconcile-errors
                # panel has a series: once the controller has reconciled.
                await wait_for(lambda: ctl.cycles >= 2, "the controller's first cycles", timeout_s=30)
                api.inject_error("PATCH", rf"/scalingpolicies/{POLICY}/status$", 403)
                # (a) the ramp and the peak.
                await wait_for(
                    lambda: load.elapsed_s() >= DROP_AT_S, "the end of the peak", timeout_s=DROP_AT_S + 30
                )
                run.stage_reached = "peak passed"
                # (b) the drop: drained pods removed. One client walks away mid-stream meanwhile.
                load.abandon_one()
                await wait_for(
                    lambda: any(b.failed for b in bal.pool.backends.values()),
                    "the balancer to count the abandoned stream",
                    timeout_s=30,
                )

                run.replicas_at_drop = deployment_replicas(api)
                removed_at_drop = len(kubelet.removed)

                def drained_and_removed() -> bool:
                    marked_now = [p for p, a in pod_annotations(api).items() if cluster.DRAIN_ANNOTATION in a]
                    return (
                        len(kubelet.removed) > removed_at_drop
                        and not marked_now
                        and deployment_replicas(api) <= run.replicas_at_drop // 2
                    )

                await wait_for(
                    drained_and_removed, "drained pods to be removed after the drop", timeout_s=120
                )
                run.removed_after_drop = [r.pod for r in kubelet.removed[removed_at_drop:]]
                run.replicas_after_drop = deployment_replicas(api)
                run.stage_reached = "drained"
                # Two scrapes more, so the end of the drain is in Prometheus too.
                drained_s = clock.now()
                await wait_for(
                    lambda: scraped_after(prom, drained_s + 1.0),
                    "Prometheus to scrape after the drain",
                    timeout_s=30,
                )
                run.panels = await asyncio.to_thread(
                    run_panel_queries, prom.url, start_s=started_wall_s, end_s=clock.now()
                )
                run.stage_reached = "dashboards queried"
            finally:
                arrivals.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await arrivals
            await load.drain(timeout_s=30)
            run.outcomes = load.outcomes
            run.peak_streams = load.peak_concurrency()
            run.needed_replicas = decide.replicas_for(run.peak_streams, STREAMS_PER_REPLICA)
            run.demand_needed_s = load.first_time_at_least(
                (run.needed_replicas - 1) * STREAMS_PER_REPLICA + 1
            )
            run.demand_peak_s = load.first_time_at_least(run.peak_streams)
            run.replicas_up_s = kubelet.replicas_at_least(run.needed_replicas)
        run.policy_range_queries = sum(
            1 for q in prom.queries() if q.get("query") == POLICY_QUERY and q.get("step") == 1
        )
        # (c) Prometheus goes away, with no load left: with data, the window would pass and a pod would go.
        run.outage_replicas_before = deployment_replicas(api)
        run.outage_stopped_s = clock.monotonic()
        await asyncio.to_thread(prom.stop)
        await wait_for(
            lambda: policy_condition(api, "DemandDataAvailable").get("status") == "False",
            "DemandDataAvailable=False after Prometheus stopped",
            timeout_s=STALE_AFTER_S + 30,
        )
        cycles_at_flip = ctl.cycles
        await wait_for(
            lambda: ctl.cycles >= cycles_at_flip + OUTAGE_CYCLES,
            f"{OUTAGE_CYCLES} reconcile cycles during the outage",
            timeout_s=OUTAGE_CYCLES * 3,
        )
        run.outage_cycles = ctl.cycles - cycles_at_flip
        run.outage_condition = policy_condition(api, "DemandDataAvailable")
        run.outage_marked_pods = sorted(
            p for p, a in pod_annotations(api).items() if cluster.DRAIN_ANNOTATION in a
        )
        run.outage_replicas_after = deployment_replicas(api)
        run.demand_data_available_metric = registry.get_sample_value(
            "forestall_controller_demand_data_available", {"namespace": NS, "policy": POLICY}
        )
        run.demand_errors = demands.errors(NS, POLICY)
        run.stage_reached = "outage observed"
    finally:
        stop.set()
        await ctl_task
        await demands.close()
        client.close()
    run.scale_up_notes = [
        e.get("note", "") for e in api.objects("events.k8s.io", "events", NS) if e.get("reason") == "ScaleUp"
    ]
    run.events = [
        f"{e.get('eventTime', '')} {e.get('reason')}: {e.get('note', '')}"
        for e in sorted(api.objects("events.k8s.io", "events", NS), key=lambda e: str(e.get("eventTime", "")))
    ]
    run.decisions = {
        reason: sample(registry, "forestall_controller_decisions_total", reason=reason)
        for reason in decide.REASON_CODES
    }
    run.drains_total = sample(registry, "forestall_controller_drains_total")
    run.reconcile_errors_total = sample(registry, "forestall_controller_reconcile_errors_total")
