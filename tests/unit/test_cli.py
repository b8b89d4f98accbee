"""The `forestall` console script: help for every subcommand, usage errors exit 2, validate exits 1 on problems."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from forestall import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "manifests" / "examples" / "scalingpolicy-vllm.yaml"


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_explains_every_option(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main([name, "--help"])
    assert caught.value.code == 0
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    _assert_documented(sub, f"forestall {name}")


def _assert_documented(parser: argparse.ArgumentParser, where: str) -> None:
    """Every option has help text; nested subcommands (`forestall forecast backtest`) each have a help line and
    documented options of their own."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            for subname, subparser in action.choices.items():
                assert subname in helped, f"{where} {subname}: subcommand has no help line"
                _assert_documented(subparser, f"{where} {subname}")
            continue
        assert action.help, f"{where}: option {action.dest} has no help text"


@pytest.mark.parametrize("argv", [["crd", "--bogus"], ["nosuchcommand"], [], ["validate"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_validate_accepts_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(EXAMPLE)]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_reports_every_bad_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = yaml.safe_load(EXAMPLE.read_text())
    bad = yaml.safe_load(EXAMPLE.read_text())
    bad["metadata"]["name"] = "broken"
    bad["spec"]["replicas"] = {"min": 7, "max": 3}
    bad["spec"]["forecast"]["quantile"] = 1.5
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump_all([good, other, bad]))
    assert cli.main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}[0] (llama-8b): valid" in out
    assert "ConfigMap" not in out
    assert f"{path}[2] (broken): spec.replicas: replicas.min must be <= replicas.max, got min=7 max=3" in out
    assert f"{path}[2] (broken): spec.forecast.quantile: must be less than 1, got 1.5" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("kind: Deployment\n", "kind: expected 'ScalingPolicy', got 'Deployment'"),
    ],
)
def test_validate_explains_unusable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    assert cli.main(["validate", str(path)]) == 1
    assert expected in capsys.readouterr().out


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read file" in capsys.readouterr().out
