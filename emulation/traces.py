"""Demand traces for `forestall simulate`: reading them, and turning them into stream arrivals.

Two kinds of file are accepted, told apart by their header:

- a per-request trace: a timestamp column and an output-token column (`GeneratedTokens`, `output_tokens`,
  `completion_tokens`...), one row per request, like `AzureLLMInferenceTrace_conv.csv`. Each row is one
  stream that arrives at its timestamp and generates that many tokens;
- a count series: a timestamp column and a count of arrivals per step, like the 10-second Azure 2024 series
  or any `timestamp,value` file. Arrivals are spread uniformly (seeded) inside each step, and each stream's
  length is drawn from the bundled per-request token distribution (the 2023 Azure conversation trace).

Count series are read with `forecast.series.read_csv` (the one CSV reader for demand series); per-request
traces through the same reader with the token column named. Rows missing from a count series (a logging
gap, as in the NASA trace) count as zero arrivals.

`Arrivals` hands out the streams of one simulation tick at a time, generated in chunks with one seeded
generator, so every policy of a run sees exactly the same arrivals without holding millions of them in
memory.

What this module does not do: simulate anything (`emulation.simulate`), or guess a column the header does
not make clear; then it raises a `ValueError` naming the columns it found.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from forecast import series as series_mod

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

TOKEN_COLUMN_HINTS = ("generatedtokens", "outputtokens", "completiontokens", "tokensout", "outtokens")
"""Header names (lowercase, without `_`, `-` or spaces) that mark the output-token column of a request log."""

BUNDLED_TRACE = "azure_llm_2024_conv_2days_30s.csv"
"""Two weekdays of the Azure 2024 LLM conversation service, requests per 30 s (see emulation/data/README)."""

BUNDLED_TOKENS = "azure_llm_2023_conv_output_tokens.csv"
"""Histogram of output tokens per request of the Azure 2023 conversation trace (19,366 requests)."""

CHUNK_S = 3600.0
"""Arrivals are generated an hour at a time: few numpy calls per tick, little memory."""


@dataclass(frozen=True)
class Trace:
    """Demand read from a file: either per-request arrivals with tokens, or arrival counts per step."""

    kind: Literal["requests", "counts"]
    start_s: float
    """Unix time the trace starts (first request, or the first step's start)."""

    end_s: float
    """Unix time the trace ends (exclusive)."""

    source: str
    columns: tuple[str, str]
    """(time column, value column) as found in the header."""

    step_s: float = 0.0
    """Counts: the step of the series. Requests: 0."""

    counts: FloatArray | None = None
    """Counts: arrivals per step, on a regular grid from `start_s` (missing rows are 0)."""

    arrival_s: FloatArray | None = None
    """Requests: arrival time of each request, sorted."""

    tokens: FloatArray | None = None
    """Requests: output tokens of each request."""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def total_arrivals(self) -> float:
        if self.counts is not None:
            return float(self.counts.sum())
        assert self.arrival_s is not None
        return float(self.arrival_s.size)


def bundled_trace_path() -> Path:
    """The small real trace shipped in the package, used when `--trace` is not given."""
    return Path(str(resources.files("emulation") / "data" / BUNDLED_TRACE))


def read_trace(path: str | Path) -> Trace:
    """Read a per-request trace or a count series, finding the columns from the header.

    Raises:
        ValueError: the file is missing, empty, or its columns cannot be told apart; the message names the
            columns found.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such trace file")
    with path.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    header = [h.strip() for h in header]
    if not header:
        raise ValueError(f"{path}: empty file, expected a header row (timestamp plus tokens or counts)")
    token_cols = [h for h in header if _norm(h) in TOKEN_COLUMN_HINTS]
    try:
        if token_cols:
            s = series_mod.read_csv(path, value_column=token_cols[0])
        else:
            s = series_mod.read_csv(path)
    except ValueError as exc:
        raise ValueError(
            f"{exc}. forestall simulate reads a per-request trace (a timestamp column and an output-token "
            f"column such as GeneratedTokens) or a count series (a timestamp column and arrivals per step)"
        ) from exc
    if token_cols:
        t = np.asarray(s.timestamps, dtype=np.float64)
        tokens = np.maximum(np.nan_to_num(np.asarray(s.values, dtype=np.float64), nan=1.0), 1.0)
        return Trace(
            kind="requests",
            start_s=float(t[0]),
            end_s=float(t[-1]) + 1.0,
            source=str(path),
            columns=(s.time_column, s.value_column),
            arrival_s=t,
            tokens=tokens,
        )
    step_s = s.step_s
    idx = np.rint((s.timestamps - s.timestamps[0]) / step_s).astype(np.int64)
    counts = np.zeros(int(idx[-1]) + 1)
    np.add.at(counts, idx, np.maximum(np.nan_to_num(s.values, nan=0.0), 0.0))
    return Trace(
        kind="counts",
        start_s=float(s.timestamps[0]),
        end_s=float(s.timestamps[0]) + counts.size * step_s,
        source=str(path),
        columns=(s.time_column, s.value_column),
        step_s=step_s,
        counts=counts,
    )


def bundled_token_sample() -> FloatArray:
    """Output tokens per request of the bundled distribution, expanded (one entry per request)."""
    text = (resources.files("emulation") / "data" / BUNDLED_TOKENS).read_text()
    rows = [line.split(",") for line in text.splitlines()[1:] if line.strip()]
    values = np.array([float(r[0]) for r in rows])
    weights = np.array([int(r[1]) for r in rows])
    return np.repeat(values, weights)


def mean_stream_s(trace: Trace, *, seconds_per_token: float) -> float:
    """Mean stream length in seconds: mean output tokens (the trace's, or the bundled ones) x time per token."""
    tokens = trace.tokens if trace.tokens is not None else bundled_token_sample()
    return float(tokens.mean()) * seconds_per_token


class Arrivals:
    """The streams of a trace, handed out tick by tick: arrival times (sorted) and durations in seconds.

    `scale` multiplies the arrival rate: count series are scaled before rounding (the fractional part is a
    seeded coin flip); request traces keep each request with probability `scale` below 1 and repeat it
    (jittered by up to a second) above 1. The same seed always gives the same streams.
    """

    def __init__(self, trace: Trace, *, scale: float, seconds_per_token: float, seed: int) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.trace = trace
        self.scale = scale
        self.seconds_per_token = seconds_per_token
        self._rng = np.random.default_rng(seed)
        self._tokens = bundled_token_sample() if trace.tokens is None else trace.tokens
        self._buf_t: FloatArray = np.empty(0)
        self._buf_d: FloatArray = np.empty(0)
        self._chunk_end_s = trace.start_s
        self.total = 0
        """Streams handed out so far."""

    def take(self, t1: float) -> tuple[FloatArray, FloatArray]:
        """Streams arriving before `t1` not yet handed out: (arrival times sorted, durations)."""
        while self._chunk_end_s < min(t1, self.trace.end_s):
            self._generate(self._chunk_end_s, min(self._chunk_end_s + CHUNK_S, self.trace.end_s))
        k = int(np.searchsorted(self._buf_t, t1, side="left"))
        t, d = self._buf_t[:k], self._buf_d[:k]
        self._buf_t, self._buf_d = self._buf_t[k:], self._buf_d[k:]
        self.total += k
        return t, d

    def _generate(self, a: float, b: float) -> None:
        tr, rng = self.trace, self._rng
        if tr.kind == "counts":
            assert tr.counts is not None
            i0 = round((a - tr.start_s) / tr.step_s)
            i1 = round((b - tr.start_s) / tr.step_s)
            scaled = tr.counts[i0:i1] * self.scale
            n = np.floor(scaled).astype(np.int64)
            n += rng.random(n.size) < (scaled - n)
            starts = tr.start_s + (i0 + np.arange(n.size)) * tr.step_s
            t = np.repeat(starts, n) + rng.random(int(n.sum())) * tr.step_s
            t.sort()
            tokens = self._tokens[rng.integers(0, self._tokens.size, t.size)]
        else:
            assert tr.arrival_s is not None and tr.tokens is not None
            lo, hi = np.searchsorted(tr.arrival_s, [a, b], side="left")
            base_t, base_tok = tr.arrival_s[lo:hi], tr.tokens[lo:hi]
            reps = np.floor(np.full(base_t.size, self.scale)).astype(np.int64)
            reps += rng.random(base_t.size) < (self.scale - np.floor(self.scale))
            t = np.repeat(base_t, reps)
            tokens = np.repeat(base_tok, reps)
            first = np.repeat(np.cumsum(reps) - reps, reps)
            copy = np.arange(t.size) - first
            t = t + np.where(copy > 0, rng.random(t.size), 0.0)
            t = np.minimum(t, b - 1e-6)
            order = np.argsort(t, kind="stable")
            t, tokens = t[order], tokens[order]
        self._buf_t = np.concatenate([self._buf_t, t])
        self._buf_d = np.concatenate([self._buf_d, np.maximum(tokens, 1.0) * self.seconds_per_token])
        self._chunk_end_s = b


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")
