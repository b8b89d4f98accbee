"""`forestall forecast backtest`: JSON that parses, errors that name the columns, plots that get written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forestall import cli

T0 = 1_700_006_400


def write_series(tmp_path: Path, days: int = 3, step_s: int = 300) -> Path:
    rng = np.random.default_rng(1)
    n = days * 86400 // step_s
    t = T0 + np.arange(n) * step_s
    mean = 20 * (1.5 + np.sin(2 * np.pi * (t % 86400) / 86400))
    p = tmp_path / "demand.csv"
    lines = ["timestamp,streams"] + [f"{int(a)},{int(b)}" for a, b in zip(t, rng.poisson(mean), strict=True)]
    p.write_text("\n".join(lines) + "\n")
    return p


def test_json_output_parses_and_reports_model_and_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write_series(tmp_path)
    code = cli.main(
        ["forecast", "backtest", "--series", str(p), "--horizon", "30m", "--quantile", "0.9", "--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["horizon_steps"] == 6 and out["quantile"] == 0.9 and out["step_s"] == 300.0
    assert out["value_column"] == "streams"
    names = [b["model"] for b in out["baselines"]]
    assert names == ["snaive_day", "recent_max"]
    for m in [out["model"], *out["baselines"]]:
        assert 0.0 <= m["coverage"] <= 1.0
        assert m["origins"] == out["model"]["origins"] > 100
        assert m["pinball_peak"] >= 0 and m["path_mae"] >= 0
    # The series is a stationary daily cycle: the calibrated q0.9 model covers about 90% of the peaks, and at
    # its quantile it scores better than both baselines (which cover only about 58%).
    model = out["model"]
    assert model["coverage"] >= 0.85 and model["under_rate"] <= 0.15
    assert all(model["pinball_peak"] < b["pinball_peak"] for b in out["baselines"])
    assert all(b["under_rate"] > model["under_rate"] for b in out["baselines"])
    assert sum(out["chosen"].values()) >= 1


def test_table_output_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_series(tmp_path)
    png = tmp_path / "out.png"
    code = cli.main(
        ["forecast", "backtest", "--series", str(p), "--horizon", "10m", "--step", "15m", "--plot", str(png)]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "snaive_day" in text and "recent_max" in text and "coverage" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resample_aggregates_before_backtesting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_series(tmp_path)
    args = ["forecast", "backtest", "--series", str(p), "--horizon", "1h", "--resample", "15m", "--json"]
    assert cli.main([*args, "--aggregate", "max"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step_s"] == 900.0 and out["horizon_steps"] == 4


def test_bad_csv_columns_error_names_the_columns_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("when,a,b\n2024-01-01 00:00:00,1,2\n2024-01-01 00:01:00,3,4\n2024-01-01 00:02:00,5,6\n")
    code = cli.main(["forecast", "backtest", "--series", str(p), "--horizon", "10m"])
    assert code == 1
    err = capsys.readouterr().err
    assert "'when', 'a', 'b'" in err and "value column" in err


def test_wide_m4_file_needs_an_id_and_then_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    p = tmp_path / "m4.csv"
    header = ",".join(f'"V{i}"' for i in range(1, 302))
    row = '"H7",' + ",".join(
        str(int(v)) for v in 50 + 10 * np.sin(np.arange(300) / 24 * 2 * np.pi) + rng.normal(0, 1, 300)
    )
    p.write_text(header + "\n" + row + "\n")
    assert cli.main(["forecast", "backtest", "--series", str(p), "--horizon", "2h"]) == 1
    assert "--m4-id" in capsys.readouterr().err
    assert cli.main(["forecast", "backtest", "--series", str(p), "--horizon", "2h", "--m4-id", "H9"]) == 1
    assert "no series 'H9'" in capsys.readouterr().err
    assert (
        cli.main(["forecast", "backtest", "--series", str(p), "--horizon", "2h", "--m4-id", "H7", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["horizon_steps"] == 2


def test_bad_durations_are_usage_errors(tmp_path: Path) -> None:
    p = write_series(tmp_path, days=1)
    with pytest.raises(SystemExit) as exc:
        cli.main(["forecast", "backtest", "--series", str(p), "--horizon", "ten minutes"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["forecast", "backtest", "--series", str(p), "--horizon", "10m", "--quantile", "1.5"])
