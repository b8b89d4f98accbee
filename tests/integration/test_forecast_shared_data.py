"""The backtest CLI on every CSV in /work/shared/data (thinned origins and few refits, to stay quick)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forestall import cli

DATA = Path("/work/shared/data")
FILES = sorted(p.name for p in DATA.glob("*.csv")) if DATA.is_dir() else []
pytestmark = pytest.mark.skipif(not FILES, reason="the shared public traces are not on this machine")


@pytest.mark.parametrize("name", FILES)
def test_backtest_cli_works_on_every_shared_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["forecast", "backtest", "--series", str(DATA / name), "--horizon", "10m", "--json"]
    args += ["--max-origins", "60", "--max-refits", "2"]
    if name.startswith("M4_"):
        args += ["--m4-id", "H1"]
    assert cli.main(args) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["origins"] > 10
    assert 0.0 <= out["model"]["coverage"] <= 1.0
    assert out["baselines"], "baselines are reported in the same run"
