"""The checked-in Grafana JSON is exactly what `python -m dashboards.generate` writes, and its queries
use the contract's metric names and the dashboards' template variables."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from dashboards import engine, generate, panels

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((generate.OUT_DIR / name).read_text())
    return data


def test_checked_in_json_is_what_the_generator_writes(tmp_path: Path) -> None:
    """Regenerate into a temporary directory and diff: edit dashboards/panels.py, never the JSON."""
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {d.filename for d in panels.DASHBOARDS}
    for path in written:
        checked_in = generate.OUT_DIR / path.name
        assert checked_in.exists(), f"{path.name} is not checked in: run `python -m dashboards.generate`"
        assert checked_in.read_text() == path.read_text(), (
            f"{path.name} is stale: run `python -m dashboards.generate`"
        )
    stray = {p.name for p in generate.OUT_DIR.glob("*.json")} - {p.name for p in written}
    assert not stray, f"JSON files no generator writes: {stray}"


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--out-dir", str(tmp_path)]) == 0
    assert generate.main(["--check", "--out-dir", str(tmp_path)]) == 0
    victim = tmp_path / panels.BALANCER.filename
    victim.write_text(victim.read_text().replace("Active streams per backend", "Active streams"))
    assert generate.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert panels.BALANCER.filename in capsys.readouterr().err


def test_generation_is_deterministic() -> None:
    for spec in panels.DASHBOARDS:
        assert engine.render(spec) == engine.render(spec)


_METRIC = re.compile(r"\b(forestall_[a-z_]+)")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _metric_names(expr: str) -> set[str]:
    names = set()
    for name in _METRIC.findall(expr):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in panels.METRICS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_queries_use_only_contract_metrics_and_all_of_them() -> None:
    queries = generate.queries()
    assert len(queries) >= 30
    used: set[str] = set()
    for dashboard, panel, expr in queries:
        names = _metric_names(expr)
        assert names, f"{dashboard} / {panel}: no forestall metric in {expr!r}"
        assert names <= set(panels.METRICS), f"{dashboard} / {panel}: unknown {names - set(panels.METRICS)}"
        used |= names
    unused = set(panels.METRICS) - used
    assert not unused, f"contract metrics no panel shows: {sorted(unused)}"


def test_balancer_metric_names_match_the_balancer_exporter() -> None:
    """The names the balancer exports (balancer/metrics.py) are the ones the dashboards query."""
    source_path = ROOT / "balancer" / "metrics.py"
    if not source_path.exists():
        pytest.skip("balancer/metrics.py has not landed")
    source = source_path.read_text()
    exported = set()
    for kind, name in re.findall(
        r'(GaugeMetricFamily|CounterMetricFamily|HistogramMetricFamily)\(\s*P \+ "(\w+)"', source
    ):
        exported.add("forestall_balancer_" + name + ("_total" if kind == "CounterMetricFamily" else ""))
    assert exported, "found no metric families in balancer/metrics.py (did its style change?)"
    assert exported == set(panels.BALANCER_METRICS)


def test_policy_scoped_panels_filter_by_the_template_variables() -> None:
    """Per-policy dashboards: every controller query with policy labels honours $namespace and $policy."""
    unlabelled = {"forestall_controller_reconcile_duration_seconds"}  # a histogram without labels (contract)
    for spec in (panels.FORECAST, panels.DECISIONS):
        data = _load(spec.filename)
        variables = {v["name"] for v in data["templating"]["list"]}
        assert {"datasource", "namespace", "policy"} <= variables
        for panel in data["panels"]:
            for target in panel["targets"]:
                if _metric_names(target["expr"]) <= unlabelled:
                    continue
                assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])
                assert 'policy=~"$policy"' in target["expr"], (panel["title"], target["expr"])


def test_panels_are_well_formed() -> None:
    for spec in panels.DASHBOARDS:
        data = _load(spec.filename)
        assert data["uid"] == spec.uid
        ids = [p["id"] for p in data["panels"]]
        assert len(ids) == len(set(ids))
        titles = [p["title"] for p in data["panels"]]
        assert len(titles) == len(set(titles)), f"{spec.title}: duplicate panel titles"
        for panel in data["panels"]:
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
            assert panel["description"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert ref_ids and len(ref_ids) == len(set(ref_ids))


def test_the_issue_s_views_are_all_there() -> None:
    titles = {d: {p for dd, p, _ in generate.queries() if dd == d} for d, _, _ in generate.queries()}
    assert {
        "Demand and forecast peak",
        "Replicas: desired, current, ready",
        "Measured lead time by stage vs horizon",
    } <= (titles["Forestall / Forecast vs demand"])
    assert {
        "Active streams per backend",
        "Hotspot score per backend",
        "Time to first byte",
        "Streams left on draining backends",
        "Admission queue",
        "Rejected streams per second",
    } <= titles["Forestall / Balancer"]
    assert {"Decisions by reason", "Drains started", "GPU-hours over the range"} <= titles[
        "Forestall / Decisions"
    ]


def test_substitute_fills_every_variable_and_refuses_unknown_ones() -> None:
    for _, _, expr in generate.queries():
        assert "$" not in generate.substitute(expr)
    assert generate.substitute("rate(x[$__rate_interval]) offset $__range") == "rate(x[1m]) offset 1h"
    with pytest.raises(ValueError, match=r"\$cluster"):
        generate.substitute('up{cluster="$cluster"}')


def _controller_exports() -> dict[str, set[str]]:
    """Metric name (as queried) -> label names, read from a live `ControllerMetrics` registry."""
    from controller import metrics

    exported: dict[str, set[str]] = {}
    for name, collector in vars(metrics.ControllerMetrics()).items():
        if name == "registry" or not hasattr(collector, "collect"):
            continue  # the registry itself, and private caches such as the labelled-children map
        family = next(iter(collector.collect()))
        queried = family.name + ("_total" if family.type == "counter" else "")
        exported[queried] = set(collector._labelnames)
    return exported


def test_controller_metric_names_and_labels_match_the_controller() -> None:
    """Names and label sets come from controller/metrics.py itself, so a rename breaks this test, not a dashboard."""
    exported = _controller_exports()
    assert set(exported) == set(panels.CONTROLLER_METRICS)
    grouping = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
    matcher = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
    for dashboard, panel, expr in generate.queries():
        names = _metric_names(expr)
        if not names <= set(exported):
            continue
        allowed = set().union(*(exported[n] for n in names)) | {"le"}
        used = {
            label.strip() for group in grouping.findall(expr) for label in group.split(",") if label.strip()
        }
        used |= set(matcher.findall(expr))
        assert used <= allowed, f"{dashboard} / {panel}: labels {used - allowed} not on {sorted(names)}"
