"""`forestall simulate` end to end through the console entry point: JSON, table, plot, and bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from emulation import traces
from forestall import cli
from tests.conftest import SHARED_DATA

POLICY_KEYS = {
    "slo_attainment",
    "wait_p99_s",
    "streams_rejected",
    "streams_cut",
    "gpu_hours",
    "gpu_hours_vs_oracle",
    "gpu_hours_vs_oracle_lead",
}


def small_trace(tmp_path: Path) -> Path:
    """Two hours of a count series: 30 requests per 10 s, then 120 for 20 minutes, then 30."""
    rows = ["timestamp,value"]
    for i in range(720):
        minute = i // 6
        value = 120 if 60 <= minute < 80 else 30
        rows.append(f"2024-05-13T{i * 10 // 3600:02d}:{i * 10 % 3600 // 60:02d}:{i * 10 % 60:02d}Z,{value}")
    path = tmp_path / "small.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_every_option_has_help() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    simulate = sub.choices["simulate"]
    for action in simulate._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_json_lists_every_policy_with_the_documented_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["simulate", "--trace", str(small_trace(tmp_path)), "--json", "--seed", "3"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"forestall", "reactive", "reactive-ca", "oracle", "oracle-lead"}
    for name, figures in out["policies"].items():
        assert POLICY_KEYS <= set(figures), name
        assert 0.0 <= figures["slo_attainment"] <= 1.0
    oracle = out["policies"]["oracle"]["gpu_hours"]
    lead = out["policies"]["oracle-lead"]["gpu_hours"]
    assert 0 < oracle < lead
    for name, figures in out["policies"].items():
        assert figures["gpu_hours_vs_oracle"] == pytest.approx(figures["gpu_hours"] / oracle, rel=1e-3), name
        assert figures["gpu_hours_vs_oracle_lead"] == pytest.approx(figures["gpu_hours"] / lead, rel=1e-3), (
            name
        )
    assert out["policies"]["forestall"]["streams_cut"] == 0


def test_compare_none_runs_forestall_and_the_oracles_and_the_table_and_plot_are_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "out" / "sim.png"
    code = cli.main(
        ["simulate", "--trace", str(small_trace(tmp_path)), "--compare", "none", "--plot", str(png)]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "forestall" in text and "oracle-lead" in text and "reactive" not in text
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_a_trace_without_usable_columns_is_refused_naming_the_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("name,colour\nfoo,red\nbar,blue\n")
    assert cli.main(["simulate", "--trace", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "'name'" in err and "'colour'" in err


def test_missing_trace_and_unknown_baseline_are_usage_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["simulate", "--trace", str(tmp_path / "nope.csv")]) == 1
    assert "no such trace file" in capsys.readouterr().err
    assert cli.main(["simulate", "--trace", str(small_trace(tmp_path)), "--compare", "keda"]) == 1
    assert "keda" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", "--peak-streams", "10", "--scale", "2"])
    assert exc.value.code == 2


def test_policy_file_sets_the_forestall_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = tmp_path / "policy.yaml"
    pol.write_text(
        "apiVersion: forestall.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: llm}\nspec:\n"
        "  scaleTargetRef: {kind: Deployment, name: llm}\n  demand: {prometheus: {query: q}}\n"
        "  capacity: {streamsPerReplica: 8, gpusPerNode: 4}\n  replicas: {min: 1, max: 100}\n"
    )
    code = cli.main(["simulate", "--trace", str(small_trace(tmp_path)), "--policy", str(pol), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["streams_per_replica"] == 8
    pol.write_text("spec:\n  capacity: {streamsPerReplica: 0}\n")
    assert cli.main(["simulate", "--trace", str(small_trace(tmp_path)), "--policy", str(pol)]) == 1
    assert "streamsPerReplica" in capsys.readouterr().err


def test_bundled_trace_is_real_and_documented() -> None:
    path = traces.bundled_trace_path()
    tr = traces.read_trace(path)
    assert tr.kind == "counts" and tr.duration_s == 2 * 86400 and tr.step_s == 30.0
    assert (path.parent / "README.md").read_text().count("CC BY 4.0") >= 2


@pytest.mark.skipif(
    not (SHARED_DATA / "AzureLLMInferenceTrace_conv.csv").is_file(), reason="shared data absent"
)
def test_real_per_request_trace_with_its_own_token_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "simulate",
            "--trace",
            str(SHARED_DATA / "AzureLLMInferenceTrace_conv.csv"),
            "--peak-streams",
            "96",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    forestall = out["policies"]["forestall"]
    assert forestall["streams_cut"] == 0
    assert out["policies"]["oracle"]["slo_attainment"] == 1.0
    assert (
        forestall["gpu_hours"] >= out["policies"]["oracle"]["gpu_hours"] or forestall["slo_attainment"] < 1.0
    )
