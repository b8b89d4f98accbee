"""Reading demand CSVs: columns found by content, event logs counted, wide M4 files refused clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forecast import series

DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="the shared public traces are not on this machine")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.csv"
    p.write_text(text)
    return p


def test_value_column_named_timestamp_is_found_by_content(tmp_path: Path) -> None:
    p = write(
        tmp_path, "Time,TIMESTAMP\n2024-05-12 00:00:00,132\n2024-05-12 00:00:10,269\n2024-05-12 00:00:20,7\n"
    )
    s = series.read_csv(p)
    assert (s.time_column, s.value_column) == ("Time", "TIMESTAMP")
    assert s.values.tolist() == [132.0, 269.0, 7.0]
    assert s.step_s == 10.0
    assert s.timestamps[0] == 1715472000.0  # naive times are UTC


def test_timezone_offsets_are_honoured(tmp_path: Path) -> None:
    p = write(tmp_path, "timestamp,requests\n1995-07-01T00:00:00-04:00,42\n1995-07-01T00:01:00-04:00,61\n")
    s = series.read_csv(p)
    assert s.timestamps.tolist() == [804571200.0, 804571260.0]


def test_unix_seconds_and_empty_cells(tmp_path: Path) -> None:
    p = write(tmp_path, "ts,streams\n1700000000,3\n1700000060,\n1700000120,5\n")
    s = series.read_csv(p)
    assert s.time_column == "ts"
    assert np.isnan(s.values[1]) and s.values[2] == 5.0


def test_ambiguous_columns_error_names_the_columns_found(tmp_path: Path) -> None:
    p = write(
        tmp_path, "when,a,b\n2024-01-01 00:00:00,1,2\n2024-01-01 00:01:00,3,4\n2024-01-01 00:02:00,3,4\n"
    )
    with pytest.raises(ValueError, match=r"'when', 'a', 'b'"):
        series.read_csv(p)
    assert series.read_csv(p, value_column="b").values.tolist() == [2.0, 4.0, 4.0]


def test_no_time_column_error_names_the_columns_found(tmp_path: Path) -> None:
    p = write(tmp_path, "foo,bar\nx,1\ny,2\n")
    with pytest.raises(ValueError, match=r"timestamp column: columns found 'foo', 'bar'"):
        series.read_csv(p)


def test_event_log_becomes_counts_per_step(tmp_path: Path) -> None:
    rows = [
        "2023-11-16 18:15:00.5",
        "2023-11-16 18:15:03.1",
        "2023-11-16 18:15:04.7",
        "2023-11-16 18:15:21.0",
    ]
    p = write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{r},1,2\n" for r in rows))
    s = series.read_csv(p, event_step_s=10.0)
    assert s.values.tolist() == [3.0, 0.0, 1.0]
    assert s.step_s == 10.0


def test_wide_m4_file_is_refused_with_the_way_out(tmp_path: Path) -> None:
    header = ",".join(f'"V{i}"' for i in range(1, 13))
    p = write(tmp_path, header + "\n" + '"H1",' + ",".join(["1"] * 11) + "\n")
    with pytest.raises(ValueError, match="read_m4"):
        series.read_csv(p)
    assert series.read_m4(p)["H1"].tolist() == [1.0] * 11


def test_resample_sums_counts_and_takes_max_of_concurrency() -> None:
    t = np.arange(6) * 10.0
    v = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0])
    ts, sums = series.resample(t, v, 30.0, how="sum")
    assert ts.tolist() == [0.0, 30.0] and sums.tolist() == [3.0, 15.0]
    _, maxes = series.resample(t, v, 30.0, how="max")
    assert maxes.tolist() == [2.0, 6.0]


@needs_data
@pytest.mark.parametrize(
    ("name", "time_column", "value_column", "step_s"),
    [
        ("azure_llm_2024_conv_invocations_10s.csv", "Time", "TIMESTAMP", 10.0),
        ("nasa_http_1995_requests_1min.csv", "timestamp", "requests", 60.0),
        ("nab_nyc_taxi.csv", "timestamp", "value", 1800.0),
        ("nab_Twitter_volume_AAPL.csv", "timestamp", "value", 300.0),
        ("AzureLLMInferenceTrace_conv.csv", "TIMESTAMP", "rows per 10 s", 10.0),
        ("AzureLLMInferenceTrace_code.csv", "TIMESTAMP", "rows per 10 s", 10.0),
    ],
)
def test_every_shared_file_is_read(name: str, time_column: str, value_column: str, step_s: float) -> None:
    s = series.read_csv(DATA / name)
    assert (s.time_column, s.value_column, s.step_s) == (time_column, value_column, step_s)
    assert s.values.size > 300 and np.nanmin(s.values) >= 0


@needs_data
def test_shared_m4_files_read_as_hourly_series() -> None:
    train = series.read_m4(DATA / "M4_Hourly-train.csv")
    test = series.read_m4(DATA / "M4_Hourly-test.csv")
    assert len(train) == len(test) == 414
    assert {v.size for v in train.values()} == {700, 960}
    assert {v.size for v in test.values()} == {48}
