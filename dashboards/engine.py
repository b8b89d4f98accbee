"""The dashboard engine: a small typed model of dashboards and panels, rendered to Grafana JSON.

`Dashboard`, `Panel`, `Target` and `Variable` say what a dashboard shows; `render()` turns one into the JSON
Grafana exports, through grafana-foundation-sdk's builders. `substitute()` fills in Grafana's template
variables so tests and the demo can run a panel's PromQL against Prometheus directly.

Why grafana-foundation-sdk rather than grafanalib: the Foundation SDK is Grafana Labs' own, generated
from the same schemas (CUE/"cog") as Grafana itself, so every panel type and option of the Grafana release
it targets is there and typed (mypy checks the builders), and its output is the JSON Grafana exports.
grafanalib is hand-written and community-maintained, lags new panel types and options (it predates the
`timeseries` panel's field-config model), and would need raw dicts for what it lacks. The SDK is pinned to
one build in `pyproject.toml` (its versions are per Grafana release, `<epoch>!<grafana version>`): the
JSON is checked in and a test regenerates it and fails on any difference, so an SDK upgrade shows up as
a reviewed diff, never as silent drift.

What this module does not do: know Forestall's metrics or panels (`dashboards.panels`), write files
(`dashboards.generate`), or talk to Grafana or Prometheus.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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

DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="${datasource}")
"""Every panel reads the Prometheus picked in the `datasource` variable, so the JSON imports anywhere."""

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

PanelKind = Literal["timeseries", "bars", "stat", "table"]


@dataclass(frozen=True)
class Variable:
    """A template variable: its name, and the PromQL `label_values(...)` listing its values (none for the
    `datasource` variable, which lists Prometheus data sources)."""

    name: str
    query: str = ""


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
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = field(default=("forestall",))

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


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
    for variable in spec.variables:
        board = board.with_variable(_variable(variable))
    for index, panel in enumerate(spec.panels, start=1):
        board = board.with_panel(_panel(panel, panel_id=index))
    return board


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """`expr` with Grafana's template variables replaced (longest names first: `$__range` before `$__r`)."""
    values = SUBSTITUTIONS if values is None else values
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    leftover = re.findall(r"\$\w+", expr)
    if leftover:
        raise ValueError(f"no value for template variable(s) {leftover} in {expr!r}")
    return expr


# ------------------------------------------------------------------------------------------ builders


def _variable(variable: Variable) -> Any:
    if not variable.query:
        return dashboard_builder.DatasourceVariable(variable.name).label("Prometheus").type("prometheus")
    return (
        dashboard_builder.QueryVariable(variable.name)
        .label(variable.name.capitalize())
        .datasource(DATASOURCE)
        .query(variable.query)
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
