"""Forestall's Grafana dashboards, generated from code: `python -m dashboards.generate` rewrites the JSON.

Three dashboards, each a JSON file beside this module, importable in Grafana (Dashboards > New > Import)
or provisioned from a ConfigMap:

- *Forecast vs demand* (`forestall-forecast.json`): observed demand, the forecast peak per quantile,
  desired / current / ready replicas, GPUs pending / provisioned / in use, the measured lead time per
  stage against the forecast horizon, and whether demand data is available; per policy through the
  `namespace` and `policy` template variables.
- *Balancer* (`forestall-balancer.json`): streams, queued streams and sessions per backend, stream
  starts and failures, hotspot scores, time to first byte, backends per state and what is left on
  draining ones, the admission queue, rejections and relayed bytes.
- *Decisions* (`forestall-decisions.json`): scale and drain decisions by reason over time and over the
  range, replicas desired vs ready, GPU-hours provisioned / in use / idle, and the controller's own
  reconcile time and errors.

Every query uses the metric names fixed in the project contracts (`forestall_balancer_*` from
`balancer/metrics.py`, `forestall_controller_*` from the controller); `METRICS` lists them and the tests
check that the dashboards use nothing else. `queries()` returns every (dashboard, panel, PromQL) read
back from the generated JSON, so the integration tests run exactly what Grafana will run, after
`substitute()` fills in the template variables.

Why grafana-foundation-sdk rather than grafanalib: the Foundation SDK is Grafana Labs' own, generated
from the same schemas (CUE/"cog") as Grafana itself, so every panel type and option of the Grafana release
it targets is there and typed (mypy checks the builders), and its output is the JSON Grafana exports.
grafanalib is hand-written and community-maintained, lags new panel types and options (it predates the
`timeseries` panel's field-config model), and would need raw dicts for what it lacks. The SDK is pinned to
one build in `pyproject.toml` (its versions are per Grafana release, `<epoch>!<grafana version>`): the
JSON is checked in and a test regenerates it and fails on any difference, so an SDK upgrade shows up as
a reviewed diff, never as silent drift.

What this module does not do: talk to Grafana or Prometheus, or define alerts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus as prometheus_builder
from grafana_foundation_sdk.builders import stat as stat_builder
from grafana_foundation_sdk.builders import table as table_builder
from grafana_foundation_sdk.builders import timeseries as timeseries_builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as dashboard_model

OUT_DIR = Path(__file__).resolve().parent
"""The generated JSON lives beside the generator, checked in."""

DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="${datasource}")
"""Every panel reads the Prometheus picked in the `datasource` variable, so the JSON imports anywhere."""

BALANCER_METRICS = (
    "forestall_balancer_active_streams",
    "forestall_balancer_queued_streams",
    "forestall_balancer_open_sessions",
    "forestall_balancer_streams_started_total",
    "forestall_balancer_streams_completed_total",
    "forestall_balancer_streams_failed_total",
    "forestall_balancer_ttfb_seconds",
    "forestall_balancer_backend_state",
    "forestall_balancer_hotspot_score",
    "forestall_balancer_admission_queue_length",
    "forestall_balancer_rejected_streams_total",
    "forestall_balancer_relayed_bytes_total",
)
CONTROLLER_METRICS = (
    "forestall_controller_observed_demand_streams",
    "forestall_controller_forecast_streams",
    "forestall_controller_horizon_seconds",
    "forestall_controller_desired_replicas",
    "forestall_controller_current_replicas",
    "forestall_controller_ready_replicas",
    "forestall_controller_pending_gpus",
    "forestall_controller_provisioned_gpus",
    "forestall_controller_gpus_in_use",
    "forestall_controller_lead_time_seconds",
    "forestall_controller_decisions_total",
    "forestall_controller_drains_total",
    "forestall_controller_demand_data_available",
    "forestall_controller_reconcile_duration_seconds",
    "forestall_controller_reconcile_errors_total",
)
METRICS = BALANCER_METRICS + CONTROLLER_METRICS
"""The metric names of the project contract (histograms by base name: `_bucket`/`_sum`/`_count` follow)."""

SUBSTITUTIONS = {
    "$datasource": "prometheus",
    "$namespace": ".*",
    "$policy": ".*",
    "$backend": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}
"""Values Grafana would put in for the template variables, to run the queries outside Grafana."""

POLICY = 'namespace=~"$namespace", policy=~"$policy"'
BACKEND = 'backend=~"$backend"'

PanelKind = Literal["timeseries", "bars", "stat", "table"]


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend (`{{label}}` placeholders)."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    """A panel: what it shows (description), how (kind, unit) and from which queries."""

    title: str
    description: str
    targets: tuple[Target, ...]
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    stack: bool = False
    fill_opacity: float = 10.0
    dashed: str = ""
    """Regex of series names drawn dashed and filled (forecasts, horizons), to tell them from measurements."""


@dataclass(frozen=True)
class Dashboard:
    """A dashboard: identity, the template variables it offers and its panels, top-left to bottom-right."""

    uid: str
    title: str
    description: str
    variables: tuple[str, ...]
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = field(default=("forestall",))

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write every dashboard's JSON into `out_dir`; returns the paths written."""
    paths = []
    for spec in DASHBOARDS:
        path = out_dir / spec.filename
        path.write_text(render(spec))
        paths.append(path)
    return paths


def render(spec: Dashboard) -> str:
    """The dashboard's JSON text, deterministic (sorted keys, fixed indentation, trailing newline)."""
    built = build(spec).build()
    data = json.loads(json.dumps(built, cls=JSONEncoder))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def build(spec: Dashboard) -> dashboard_builder.Dashboard:
    """The Foundation SDK builder for one dashboard."""
    board = (
        dashboard_builder.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(list(spec.tags))
        .editable()
        .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
    )
    for name in spec.variables:
        board = board.with_variable(_variable(name))
    for index, panel in enumerate(spec.panels, start=1):
        board = board.with_panel(_panel(panel, panel_id=index))
    return board


def queries(out_dir: Path = OUT_DIR) -> list[tuple[str, str, str]]:
    """Every (dashboard title, panel title, PromQL) in the generated JSON files, in panel order."""
    out = []
    for spec in DASHBOARDS:
        data = json.loads((out_dir / spec.filename).read_text())
        for panel in data["panels"]:
            for target in panel.get("targets", []):
                out.append((data["title"], panel["title"], target["expr"]))
    return out


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """`expr` with Grafana's template variables replaced (longest names first: `$__range` before `$__r`)."""
    values = SUBSTITUTIONS if values is None else values
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    leftover = re.findall(r"\$\w+", expr)
    if leftover:
        raise ValueError(f"no value for template variable(s) {leftover} in {expr!r}")
    return expr


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dashboards.generate [--check]`: write the JSON, or with --check report stale files."""
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="directory for the JSON files")
    args = parser.parse_args(argv)
    if args.check:
        stale = [s.filename for s in DASHBOARDS if not _same(args.out_dir / s.filename, render(s))]
        for name in stale:
            print(f"{name} is stale: run `python -m dashboards.generate`", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(args.out_dir):
        print(path)
    return 0


def _same(path: Path, text: str) -> bool:
    return path.exists() and path.read_text() == text


# ------------------------------------------------------------------------------------------ builders


def _variable(name: str) -> Any:
    if name == "datasource":
        return dashboard_builder.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    queries_by_name = {
        "namespace": "label_values(forestall_controller_observed_demand_streams, namespace)",
        "policy": 'label_values(forestall_controller_observed_demand_streams{namespace=~"$namespace"}, policy)',
        "backend": "label_values(forestall_balancer_active_streams, backend)",
    }
    return (
        dashboard_builder.QueryVariable(name)
        .label(name.capitalize())
        .datasource(DATASOURCE)
        .query(queries_by_name[name])
        .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def _query(target: Target, ref_id: str) -> prometheus_builder.Dataquery:
    query = prometheus_builder.Dataquery().expr(target.expr).ref_id(ref_id).datasource(DATASOURCE)
    if target.legend:
        query = query.legend_format(target.legend)
    return query.instant() if target.instant else query.range()


def _panel(panel: Panel, *, panel_id: int) -> Any:
    builder: Any
    if panel.kind in ("timeseries", "bars"):
        builder = (
            timeseries_builder.Panel()
            .fill_opacity(panel.fill_opacity)
            .line_width(1)
            .legend(
                common_builder.VizLegendOptions()
                .show_legend(True)
                .display_mode(common_model.LegendDisplayMode.TABLE)
                .placement(common_model.LegendPlacement.BOTTOM)
                .calcs(["lastNotNull", "max"])
            )
        )
        if panel.kind == "bars":
            builder = builder.draw_style(common_model.GraphDrawStyle.BARS).fill_opacity(80)
        if panel.stack:
            builder = builder.stacking(common_builder.StackingConfig().mode(common_model.StackingMode.NORMAL))
    elif panel.kind == "stat":
        builder = (
            stat_builder.Panel()
            .graph_mode(common_model.BigValueGraphMode.AREA)
            .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]))
        )
    else:
        builder = table_builder.Panel()
    builder = (
        builder.id(panel_id)
        .title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .span(panel.width)
        .height(panel.height)
    )
    if panel.dashed:
        builder = builder.override_by_regexp(
            panel.dashed,
            [
                dashboard_model.DynamicConfigValue(
                    id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                ),
                dashboard_model.DynamicConfigValue(id_val="custom.fillOpacity", value=25),
            ],
        )
    for index, target in enumerate(panel.targets):
        builder = builder.with_target(_query(target, chr(ord("A") + index)))
    return builder


# --------------------------------------------------------------------------------------- the dashboards

FORECAST = Dashboard(
    uid="forestall-forecast",
    title="Forestall / Forecast vs demand",
    description="Observed stream demand against the forecast peak, capacity and the measured lead time, per policy.",
    variables=("datasource", "namespace", "policy"),
    panels=(
        Panel(
            title="Demand and forecast peak",
            description="Concurrent streams now, and the forecast peak over the horizon per quantile: "
            "demand should stay under the upper quantile, which is what capacity is provisioned for.",
            targets=(
                Target(
                    f"sum by (namespace, policy) (forestall_controller_observed_demand_streams{{{POLICY}}})",
                    "{{namespace}}/{{policy}} observed",
                ),
                Target(
                    f"max by (namespace, policy, quantile) (forestall_controller_forecast_streams{{{POLICY}}})",
                    "{{namespace}}/{{policy}} forecast q{{quantile}}",
                ),
            ),
            dashed="/forecast/",
            fill_opacity=0,
            width=24,
            height=10,
        ),
        Panel(
            title="Replicas: desired, current, ready",
            description="Desired is the plan; current is what the target has; ready is what serves. "
            "Desired rising before demand does is the point.",
            targets=(
                Target(
                    f"sum by (namespace, policy) (forestall_controller_desired_replicas{{{POLICY}}})",
                    "{{policy}} desired",
                ),
                Target(
                    f"sum by (namespace, policy) (forestall_controller_current_replicas{{{POLICY}}})",
                    "{{policy}} current",
                ),
                Target(
                    f"sum by (namespace, policy) (forestall_controller_ready_replicas{{{POLICY}}})",
                    "{{policy}} ready",
                ),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="GPUs: pending, provisioned, in use",
            description="GPUs requested but not yet on a Ready node (pending), on Ready nodes for this "
            "policy (provisioned) and held by worker pods (in use).",
            targets=(
                Target(
                    f"sum by (policy) (forestall_controller_pending_gpus{{{POLICY}}})", "{{policy}} pending"
                ),
                Target(
                    f"sum by (policy) (forestall_controller_provisioned_gpus{{{POLICY}}})",
                    "{{policy}} provisioned",
                ),
                Target(
                    f"sum by (policy) (forestall_controller_gpus_in_use{{{POLICY}}})", "{{policy}} in use"
                ),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="Measured lead time by stage vs horizon",
            description="Node provisioning, pod start and model load as measured (stacked), against the "
            "horizon the forecast covers: the stack should stay under the horizon line.",
            targets=(
                Target(
                    f"max by (policy, stage) (forestall_controller_lead_time_seconds{{{POLICY}}})",
                    "{{policy}} {{stage}}",
                ),
                Target(
                    f"max by (policy) (forestall_controller_horizon_seconds{{{POLICY}}})",
                    "{{policy}} horizon",
                ),
            ),
            unit="s",
            dashed="/horizon/",
        ),
        Panel(
            title="Demand data available",
            description="1 when Prometheus and the balancer signals are fresh; 0 means capacity is held "
            "(never lowered) and the policy's DemandDataAvailable condition is False.",
            targets=(
                Target(
                    f"min by (namespace, policy) (forestall_controller_demand_data_available{{{POLICY}}})",
                    "{{namespace}}/{{policy}}",
                ),
            ),
            kind="stat",
            width=12,
            height=6,
        ),
    ),
)

BALANCER = Dashboard(
    uid="forestall-balancer",
    title="Forestall / Balancer",
    description="Streams per backend, hotspots, time to first byte, drains and admission, summed over balancer replicas.",
    variables=("datasource", "backend"),
    panels=(
        Panel(
            title="Active streams per backend",
            description="Streams counted from pick to last byte: the load the balancer levels.",
            targets=(
                Target(f"sum by (backend) (forestall_balancer_active_streams{{{BACKEND}}})", "{{backend}}"),
            ),
            stack=True,
        ),
        Panel(
            title="Queued streams and sessions per backend",
            description="Streams the backend reports waiting (vLLM num_requests_waiting) and MCP sessions pinned to it.",
            targets=(
                Target(
                    f"sum by (backend) (forestall_balancer_queued_streams{{{BACKEND}}})", "{{backend}} queued"
                ),
                Target(
                    f"sum by (backend) (forestall_balancer_open_sessions{{{BACKEND}}})",
                    "{{backend}} sessions",
                ),
            ),
        ),
        Panel(
            title="Stream starts and completions per second",
            description="Placement rate per backend, and completions: a gap that grows means streams pile up.",
            targets=(
                Target(
                    f"sum by (backend) (rate(forestall_balancer_streams_started_total{{{BACKEND}}}[$__rate_interval]))",
                    "{{backend}} started",
                ),
                Target(
                    f"sum(rate(forestall_balancer_streams_completed_total{{{BACKEND}}}[$__rate_interval]))",
                    "all completed",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            title="Failed streams per second by reason",
            description="Connect errors, resets, timeouts, JSON-RPC errors in 200s, backend gone mid-stream.",
            targets=(
                Target(
                    f"sum by (backend, reason) (rate(forestall_balancer_streams_failed_total{{{BACKEND}}}[$__rate_interval]))",
                    "{{backend}} {{reason}}",
                ),
            ),
            unit="reqps",
            kind="bars",
        ),
        Panel(
            title="Hotspot score per backend",
            description="Load over the weighted mean load; above the configured factor for long enough is a hotspot.",
            targets=(
                Target(f"max by (backend) (forestall_balancer_hotspot_score{{{BACKEND}}})", "{{backend}}"),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="Time to first byte",
            description="p50 and p99 over all backends, and p99 per backend, from the balancer's histogram.",
            targets=(
                Target(
                    f"histogram_quantile(0.5, sum by (le) (rate(forestall_balancer_ttfb_seconds_bucket{{{BACKEND}}}[$__rate_interval])))",
                    "p50",
                ),
                Target(
                    f"histogram_quantile(0.99, sum by (le) (rate(forestall_balancer_ttfb_seconds_bucket{{{BACKEND}}}[$__rate_interval])))",
                    "p99",
                ),
                Target(
                    f"histogram_quantile(0.99, sum by (backend, le) (rate(forestall_balancer_ttfb_seconds_bucket{{{BACKEND}}}[$__rate_interval])))",
                    "{{backend}} p99",
                ),
            ),
            unit="s",
            fill_opacity=0,
        ),
        Panel(
            title="Backends by state",
            description="How many backends are warming, ready, draining or ejected (max over balancer replicas).",
            targets=(
                Target(
                    f"sum by (state) (max by (backend, state) (forestall_balancer_backend_state{{{BACKEND}}}))",
                    "{{state}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            title="Streams left on draining backends",
            description="What a drain waits for: the controller removes a draining pod when this reaches 0 "
            "or at the drain timeout.",
            targets=(
                Target(
                    f"sum by (backend) (forestall_balancer_active_streams{{{BACKEND}}} "
                    f'and on (backend) (forestall_balancer_backend_state{{{BACKEND}, state="draining"}} == 1))',
                    "{{backend}}",
                ),
            ),
        ),
        Panel(
            title="Admission queue",
            description="Streams waiting because every backend is at capacity (capacity on its way).",
            targets=(Target("sum(forestall_balancer_admission_queue_length)", "queued"),),
        ),
        Panel(
            title="Rejected streams per second",
            description="Streams answered 503 with Retry-After: queue full or waited too long. Should be 0.",
            targets=(
                Target("sum(rate(forestall_balancer_rejected_streams_total[$__rate_interval]))", "rejected"),
            ),
            unit="reqps",
            kind="bars",
        ),
        Panel(
            title="Relayed bytes per second",
            description="Response body bytes relayed, per backend.",
            targets=(
                Target(
                    f"sum by (backend) (rate(forestall_balancer_relayed_bytes_total{{{BACKEND}}}[$__rate_interval]))",
                    "{{backend}}",
                ),
            ),
            unit="Bps",
            width=24,
        ),
    ),
)

DECISIONS = Dashboard(
    uid="forestall-decisions",
    title="Forestall / Decisions",
    description="Scale and drain decisions with their reasons, GPU-hours, and the controller's own health.",
    variables=("datasource", "namespace", "policy"),
    panels=(
        Panel(
            title="Decisions by reason",
            description="Each reconcile's plan reason (forecast scale-up, reactive floor, hotspot, "
            "scale-down, hold on missing data, ...), counted per interval.",
            targets=(
                Target(
                    f"sum by (reason) (increase(forestall_controller_decisions_total{{{POLICY}}}[$__rate_interval]))",
                    "{{reason}}",
                ),
            ),
            kind="bars",
            stack=True,
            width=24,
        ),
        Panel(
            title="Drains started",
            description="Pods marked for removal (drained first, removed when empty or at the timeout).",
            targets=(
                Target(
                    f"sum by (namespace, policy) (increase(forestall_controller_drains_total{{{POLICY}}}[$__rate_interval]))",
                    "{{namespace}}/{{policy}}",
                ),
            ),
            kind="bars",
        ),
        Panel(
            title="Replicas desired vs ready",
            description="The decisions' effect: steps in desired, and ready following a lead time later.",
            targets=(
                Target(
                    f"sum by (policy) (forestall_controller_desired_replicas{{{POLICY}}})",
                    "{{policy}} desired",
                ),
                Target(
                    f"sum by (policy) (forestall_controller_ready_replicas{{{POLICY}}})", "{{policy}} ready"
                ),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="Decisions over the range",
            description="How often each reason decided, per policy, over the dashboard's time range.",
            targets=(
                Target(
                    f"sum by (namespace, policy, reason) (increase(forestall_controller_decisions_total{{{POLICY}}}[$__range]))",
                    instant=True,
                ),
            ),
            kind="table",
        ),
        Panel(
            title="GPU-hours over the range",
            description="GPUs provisioned and in use integrated over the range (1-minute samples), and "
            "their difference: the idle GPU-hours paid for staying ahead of demand.",
            targets=(
                Target(
                    f"sum by (policy) (sum_over_time(forestall_controller_provisioned_gpus{{{POLICY}}}[$__range:1m])) / 60",
                    "{{policy}} provisioned",
                    instant=True,
                ),
                Target(
                    f"sum by (policy) (sum_over_time(forestall_controller_gpus_in_use{{{POLICY}}}[$__range:1m])) / 60",
                    "{{policy}} in use",
                    instant=True,
                ),
                Target(
                    f"sum by (policy) (sum_over_time((forestall_controller_provisioned_gpus{{{POLICY}}} "
                    f"- forestall_controller_gpus_in_use{{{POLICY}}})[$__range:1m])) / 60",
                    "{{policy}} idle",
                    instant=True,
                ),
            ),
            kind="stat",
            unit="h",
        ),
        Panel(
            title="GPUs provisioned (GPU-hours per hour)",
            description="The bill's rate: GPUs on Ready nodes for each policy.",
            targets=(
                Target(
                    f"sum by (policy) (forestall_controller_provisioned_gpus{{{POLICY}}})",
                    "{{policy}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            title="Reconcile duration",
            description="p50 and p99 of one policy's reconcile (read, forecast, decide, act).",
            targets=(
                Target(
                    "histogram_quantile(0.5, sum by (le) (rate(forestall_controller_reconcile_duration_seconds_bucket[$__rate_interval])))",
                    "p50",
                ),
                Target(
                    "histogram_quantile(0.99, sum by (le) (rate(forestall_controller_reconcile_duration_seconds_bucket[$__rate_interval])))",
                    "p99",
                ),
            ),
            unit="s",
            fill_opacity=0,
        ),
        Panel(
            title="Reconcile errors per second",
            description="Failed reconciles (API errors, conflicts retried later). The others carry on.",
            targets=(
                Target(
                    f"sum by (namespace, policy) (rate(forestall_controller_reconcile_errors_total{{{POLICY}}}[$__rate_interval]))",
                    "{{namespace}}/{{policy}}",
                ),
            ),
            unit="reqps",
            kind="bars",
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (FORECAST, BALANCER, DECISIONS)


if __name__ == "__main__":
    sys.exit(main())
