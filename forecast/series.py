"""Demand series: reading them from CSV, checking them, and putting them on a regular step.

The forecasters work on one regular grid of `step_s` seconds with NaN where a sample is missing. This module
is the one place that turns what callers have (a CSV from /work/shared/data, Prometheus range-query samples,
a simulator's arrays) into that grid, and the one place that rejects input it cannot use, with a
`ValueError` naming the problem (wrong shape, duplicate or decreasing timestamps, off-grid samples, negative
or infinite values, all NaN).

`read_csv` finds the timestamp and value columns by content, not only by name: in the Azure 2024 file the
column named `TIMESTAMP` holds the counts and `Time` holds the times. A file with one row per request
(irregular timestamps, such as the Azure 2023 per-request traces) is turned into arrivals per `event_step_s`.
The M4 competition files are wide (one series per row, no timestamps); `read_csv` refuses them with a
message pointing at `read_m4`, which returns each row as an hourly series.

It does not resample silently: `resample` is explicit (sum for counts, max for concurrency).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

GRID_TOLERANCE = 0.01
"""Fraction of a step a sample may sit off the grid (Prometheus and CSV rounding) and still count as on it."""

TIME_NAMES = ("timestamp", "time", "ts", "date", "datetime", "epoch", "t")
"""Header names that suggest a time column, used only to break ties between columns that parse as times."""

VALUE_NAMES = ("value", "values", "requests", "count", "counts", "streams", "demand", "y", "load")
"""Header names that suggest the value column, used only to break ties between numeric columns."""

SNIFF_ROWS = 200
"""Rows inspected to decide what a column holds; enough to see the format, cheap on big files."""

M4_HOURLY_STEP_S = 3600.0
"""M4 gives no dates; its hourly series are read onto a one-hour grid starting at t=0."""


@dataclass(frozen=True)
class Series:
    """One demand series read from a file: unix-second timestamps (increasing) and values."""

    timestamps: FloatArray
    values: FloatArray
    time_column: str
    value_column: str

    @property
    def step_s(self) -> float:
        """The most common spacing between samples, in seconds."""
        return infer_step_s(self.timestamps)


def infer_step_s(timestamps: FloatArray) -> float:
    """The median spacing of increasing timestamps (gaps do not move the median)."""
    if timestamps.size < 2:
        raise ValueError(f"need at least 2 timestamps to infer the step, got {timestamps.size}")
    diffs = np.diff(timestamps)
    step = float(np.median(diffs))
    if not step > 0:
        raise ValueError(f"timestamps must increase; median spacing is {step}")
    return step


def check_arrays(timestamps: object, values: object) -> tuple[FloatArray, FloatArray]:
    """Validate a (timestamps, values) pair and return them as float arrays.

    Raises:
        ValueError: wrong shape or length, non-finite or non-increasing timestamps, negative or infinite
            values. NaN values are allowed (missing samples).
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    vs = np.asarray(values, dtype=np.float64)
    if ts.ndim != 1 or vs.ndim != 1:
        raise ValueError(
            f"timestamps and values must be 1-D arrays, got shapes {ts.shape} and {vs.shape}; "
            "pass one series at a time"
        )
    if ts.shape != vs.shape:
        raise ValueError(f"timestamps and values differ in length: {ts.size} timestamps, {vs.size} values")
    if ts.size == 0:
        raise ValueError("empty series: got 0 samples")
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"timestamps must be finite unix seconds; {int(np.sum(~np.isfinite(ts)))} are not")
    diffs = np.diff(ts)
    if np.any(diffs == 0):
        i = int(np.argmax(diffs == 0))
        raise ValueError(f"duplicate timestamps: {ts[i]!r} appears more than once (index {i} and {i + 1})")
    if np.any(diffs < 0):
        i = int(np.argmax(diffs < 0))
        raise ValueError(
            f"timestamps are not increasing (non-monotonic): index {i + 1} ({ts[i + 1]!r}) comes after "
            f"{ts[i]!r}; sort them first"
        )
    if np.any(np.isinf(vs)):
        raise ValueError(f"values must be finite or NaN; {int(np.sum(np.isinf(vs)))} are infinite")
    negative = vs < 0
    if np.any(negative):
        raise ValueError(
            f"demand cannot be negative: {int(np.sum(negative))} values are < 0 (first {vs[negative][0]!r})"
        )
    return ts, vs


def to_grid(
    timestamps: FloatArray, values: FloatArray, step_s: float, *, origin_s: float | None = None
) -> tuple[int, FloatArray]:
    """Place checked samples on a regular grid of `step_s` seconds, NaN in the gaps.

    Returns `(first_index, grid)` where sample `grid[i]` belongs to unix time `(first_index + i) * step_s`
    (or `origin_s + i * step_s` when `origin_s` is given, with `first_index` then 0-based from it).

    Raises:
        ValueError: a sample is off the grid by more than `GRID_TOLERANCE` of a step.
    """
    if not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"step_s must be a positive number of seconds, got {step_s!r}")
    base = 0.0 if origin_s is None else origin_s
    pos = (timestamps - base) / step_s
    idx = np.rint(pos)
    off = np.abs(pos - idx)
    if np.any(off > GRID_TOLERANCE):
        i = int(np.argmax(off > GRID_TOLERANCE))
        raise ValueError(
            f"timestamps are not on a regular step of {step_s} s: sample {i} at {timestamps[i]!r} is "
            f"{off[i] * step_s:.3f} s off the grid; resample the series to a regular step first"
        )
    idx_i = idx.astype(np.int64)
    first = int(idx_i[0])
    grid = np.full(int(idx_i[-1]) - first + 1, np.nan)
    grid[idx_i - first] = values
    return first, grid


def resample(
    timestamps: FloatArray, values: FloatArray, step_s: float, *, how: Literal["sum", "max", "mean"]
) -> tuple[FloatArray, FloatArray]:
    """Aggregate onto a coarser regular step: `sum` for counts per step, `max` for concurrency.

    Bins are `[k * step_s, (k + 1) * step_s)` in unix time and are labelled by their start. A bin with no
    sample, or only NaN samples, is NaN.
    """
    if how not in ("sum", "max", "mean"):
        raise ValueError(f"resample how must be 'sum', 'max' or 'mean', got {how!r}")
    if not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"resample step must be a positive number of seconds, got {step_s!r}")
    ts, vs = check_arrays(timestamps, values)
    k = np.floor(ts / step_s).astype(np.int64)
    first = int(k[0])
    n = int(k[-1]) - first + 1
    k -= first
    ok = ~np.isnan(vs)
    out = np.full(n, np.nan)
    seen = np.bincount(k[ok], minlength=n) > 0
    if how == "max":
        acc = np.full(n, -np.inf)
        np.maximum.at(acc, k[ok], vs[ok])
        out[seen] = acc[seen]
    else:
        total = np.bincount(k[ok], weights=vs[ok], minlength=n)
        if how == "sum":
            out[seen] = total[seen]
        else:
            out[seen] = total[seen] / np.bincount(k[ok], minlength=n)[seen]
    return (np.arange(n, dtype=np.float64) + first) * step_s, out


def read_csv(
    path: str | Path,
    *,
    time_column: str | None = None,
    value_column: str | None = None,
    event_step_s: float = 10.0,
) -> Series:
    """Read a demand series from a CSV file with a header, finding its time and value columns.

    A column is a time column if its values parse as ISO 8601 dates (naive ones are taken as UTC) or, for a
    time-like header name, as unix seconds. The value column is the one numeric column left; with several,
    a conventional name (`value`, `requests`, `count`...) decides. When the timestamps are irregular (one
    row per event), the series is the number of rows per `event_step_s` seconds.

    Raises:
        ValueError: the file is wide (M4), or the columns cannot be told apart; the message names the
            columns found.
    """
    path = Path(path)
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: empty file, expected a header row and data")
    header = [h.strip() for h in rows[0]]
    data = [r for r in rows[1:] if any(c.strip() for c in r)]
    found = ", ".join(repr(h) for h in header)
    if _looks_like_m4(header, data):
        raise ValueError(
            f"{path}: wide-format file (columns {header[0]!r}, {header[1]!r}, ... {header[-1]!r}; one series "
            "per row, no timestamps), as in the M4 competition; read it with forecast.series.read_m4, or "
            "backtest one row with `forestall forecast backtest --series FILE --m4-id H1`"
        )
    if not data:
        raise ValueError(f"{path}: no data rows under the header (columns found: {found})")
    columns = {name: [r[i].strip() if i < len(r) else "" for r in data] for i, name in enumerate(header)}
    kinds = {name: _column_kind(name, col[:SNIFF_ROWS]) for name, col in columns.items()}

    if time_column is None:
        dates = [n for n, k in kinds.items() if k == "date"]
        epochs = [n for n, k in kinds.items() if k == "epoch"]
        candidates = dates or epochs
        if len(candidates) > 1:
            named = [n for n in candidates if n.lower() in TIME_NAMES]
            candidates = named if len(named) == 1 else candidates
        if len(candidates) != 1:
            raise ValueError(
                f"{path}: cannot tell the timestamp column: columns found {found}; "
                f"{'several' if candidates else 'none'} parse as times"
                f"{' (' + ', '.join(candidates) + ')' if candidates else ''}; pass time_column"
            )
        time_column = candidates[0]
    elif time_column not in columns:
        raise ValueError(f"{path}: no column {time_column!r}; columns found: {found}")
    timestamps = _parse_times(columns[time_column], path=path, column=time_column)

    order_ok = bool(np.all(np.diff(timestamps) > 0))
    if value_column is None and not _regular(timestamps):
        # One row per event (a request log): the demand is the arrival count per step.
        t_sorted = np.sort(timestamps)
        ts, vs = resample(t_sorted, np.ones_like(t_sorted), event_step_s, how="sum")
        return Series(ts, np.nan_to_num(vs, nan=0.0), time_column, f"rows per {event_step_s:g} s")
    if value_column is None:
        numeric = [n for n, k in kinds.items() if n != time_column and k in ("number", "epoch")]
        if len(numeric) > 1:
            named = [n for n in numeric if n.lower() in VALUE_NAMES]
            numeric = named if len(named) == 1 else numeric
        if len(numeric) != 1:
            raise ValueError(
                f"{path}: cannot tell the value column: columns found {found}; time column {time_column!r}; "
                f"numeric columns: {', '.join(repr(n) for n in numeric) or 'none'}; pass value_column"
            )
        value_column = numeric[0]
    elif value_column not in columns:
        raise ValueError(f"{path}: no column {value_column!r}; columns found: {found}")
    values = _parse_numbers(columns[value_column], path=path, column=value_column)
    if not order_ok:
        order = np.argsort(timestamps, kind="stable")
        timestamps, values = timestamps[order], values[order]
    ts, vs = check_arrays(timestamps, values)
    return Series(ts, vs, time_column, value_column)


def read_m4(path: str | Path) -> dict[str, FloatArray]:
    """Read a wide M4 file: `{series id: values}`, trailing empty cells dropped."""
    out: dict[str, FloatArray] = {}
    with Path(path).open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        for row in reader:
            if not row:
                continue
            cells = [c for c in row[1:] if c.strip() != ""]
            out[row[0].strip()] = np.array([float(c) for c in cells], dtype=np.float64)
    if not out:
        raise ValueError(f"{path}: no series rows under the header")
    return out


def m4_series(values: FloatArray) -> Series:
    """An M4 row as a Series on a one-hour grid from t=0 (M4 gives no dates)."""
    return Series(
        np.arange(values.size, dtype=np.float64) * M4_HOURLY_STEP_S, values.astype(np.float64), "V1", "V2.."
    )


def _looks_like_m4(header: list[str], data: list[list[str]]) -> bool:
    if len(header) < 10 or not all(h.upper().startswith("V") and h[1:].isdigit() for h in header[:5]):
        return False
    return bool(data) and not _is_number(data[0][0].strip())


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _column_kind(name: str, sample: list[str]) -> str:
    cells = [c for c in sample if c]
    if not cells:
        return "empty"
    if all(_is_number(c) for c in cells):
        vals = np.array([float(c) for c in cells])
        if name.lower() in TIME_NAMES and np.all(vals > 1e8) and np.all(np.diff(vals) > 0):
            return "epoch"
        return "number"
    try:
        for c in cells[:20]:
            datetime.fromisoformat(c)
    except ValueError:
        return "text"
    return "date"


def _parse_times(cells: list[str], *, path: Path, column: str) -> FloatArray:
    if all(_is_number(c) for c in cells[:SNIFF_ROWS]):
        return _parse_numbers(cells, path=path, column=column)
    if not any(c.endswith("Z") or "+" in c[10:] or "-" in c[10:] for c in cells[:SNIFF_ROWS]):
        try:
            arr = np.array(cells, dtype="datetime64[us]")
            return arr.astype(np.int64).astype(np.float64) / 1e6
        except ValueError:
            pass
    out = np.empty(len(cells))
    for i, c in enumerate(cells):
        try:
            dt = datetime.fromisoformat(c)
        except ValueError as exc:
            raise ValueError(f"{path}: row {i + 2}: {column}={c!r} is not an ISO 8601 time") from exc
        out[i] = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    return out


def _parse_numbers(cells: list[str], *, path: Path, column: str) -> FloatArray:
    out = np.empty(len(cells))
    for i, c in enumerate(cells):
        if c == "" or c.lower() in ("nan", "na", "null"):
            out[i] = np.nan
            continue
        try:
            out[i] = float(c)
        except ValueError as exc:
            raise ValueError(f"{path}: row {i + 2}: {column}={c!r} is not a number") from exc
    return out


def _regular(timestamps: FloatArray) -> bool:
    """Most samples one step apart: a sampled series rather than an event log."""
    if timestamps.size < 3:
        return True
    diffs = np.diff(np.sort(timestamps))
    step = float(np.median(diffs))
    if step <= 0:
        return False
    return float(np.mean(np.abs(diffs - step) <= GRID_TOLERANCE * step)) >= 0.9
