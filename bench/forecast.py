"""Forecast benchmarks: calibration and accuracy of the peak on real demand, speed and memory.

1. Real series (/work/shared/data: Azure LLM 2024 at 10 s, NASA HTTP 1995 at 1 min, NYC taxi at 30 min,
   Twitter AAPL at 5 min) at horizons of 10 and 30 minutes (rounded up to whole steps): rolling-origin
   backtest (`forecast.backtest`) over the second half of each series, the model refitted at most 24 times,
   origins thinned evenly to at most `--max-origins`. Reports coverage of the 95% peak quantile (target
   93-97%) and pinball loss of the peak relative to seasonal naive by day (target <= 0.8x).
2. Speed on one core (the process is pinned to CPU 0 and OpenMP held to one thread): `fit` on 14 days of
   1-minute data (NASA HTTP), the first `forecast` (which runs the calibration backtest), and `update` of
   one new sample + `forecast` in the controller's steady state, including the hourly refits.
   A refit that comes due is spread over the following calls (`Forecaster._start_refit`), so each call
   is timed both as wall time and as the process's CPU time: on a shared machine the wall time also counts
   the waits for a core, which no change to the forecaster can remove.
3. Memory: peak traced allocation during fit + first forecast, and the pickled size of the fitted model.

Run: `.venv/bin/python bench/forecast.py [--max-origins N] [--no-record]`. Also `bench/m4.py` for M4 Hourly.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import record
from forecast import Forecaster, backtest, series

DATA = Path("/work/shared/data")
REAL = [
    "azure_llm_2024_conv_invocations_10s.csv",
    "nasa_http_1995_requests_1min.csv",
    "nab_nyc_taxi.csv",
    "nab_Twitter_volume_AAPL.csv",
]
HORIZONS_MIN = (10, 30)
Q = 0.95


def real_series(max_origins: int) -> tuple[str, list[bool]]:
    lines = [
        "| series | step | horizon | origins | coverage of q=0.95 peak | pinball (peak) | snaive_day pinball | "
        "ratio | recent_max pinball | mean shortfall | mean excess | models chosen (blocks) | runtime (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    ok: list[bool] = []
    for name in REAL:
        s = series.read_csv(DATA / name)
        for minutes in HORIZONS_MIN:
            h = max(1, math.ceil(minutes * 60 / s.step_s - 1e-9))
            t0 = time.perf_counter()
            r = backtest.backtest(
                s.timestamps, s.values, step_s=s.step_s, horizon_steps=h, quantile=Q, max_origins=max_origins
            )
            took = time.perf_counter() - t0
            base = {b.model: b for b in r.baselines}
            sn = base["snaive_day"].pinball_peak
            ratio = r.model.pinball_peak / sn
            good = 0.93 <= r.model.coverage <= 0.97 and ratio <= 0.8
            ok.append(good)
            chosen = ", ".join(f"{k} {v}" for k, v in sorted(r.chosen.items(), key=lambda kv: -kv[1])[:3])
            more = len(r.chosen) - 3
            lines.append(
                f"| {name} | {s.step_s:g} s | {minutes} min ({h} steps) | {r.model.origins} | "
                f"{r.model.coverage:.1%}{'' if 0.93 <= r.model.coverage <= 0.97 else ' (miss)'} | "
                f"{r.model.pinball_peak:.2f} | {sn:.2f} | {ratio:.2f}x{'' if ratio <= 0.8 else ' (miss)'} | "
                f"{base['recent_max'].pinball_peak:.2f} | {r.model.mean_shortfall:.1f} | {r.model.mean_excess:.1f} | "
                f"{chosen}{f' +{more} more' if more > 0 else ''} | {took:.0f} |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines), ok


def speed_and_memory() -> str:
    s = series.read_csv(DATA / "nasa_http_1995_requests_1min.csv")
    n = 14 * 1440
    # 14 days ending on 1995-07-28 (before the July/August gap), then the next samples as live updates.
    end = int(np.searchsorted(s.timestamps, s.timestamps[0] + 27 * 86400))
    ts, vs = s.timestamps[end - n : end], s.values[end - n : end]
    live_t, live_v = s.timestamps[end : end + 400], s.values[end : end + 400]
    fits, firsts, firsts_cpu = [], [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        f = Forecaster("auto", 60.0).fit(ts, vs)
        t1 = time.perf_counter()
        f.forecast(10, quantiles=(0.5, 0.95))
        t2 = time.perf_counter()
        fits.append(t1 - t0)
        firsts.append(t2 - t0)
        firsts_cpu.append(time.process_time() - c0)
    model = f.model_name_
    steady, steady_cpu = [], []
    for i in range(live_t.size):
        t0, c0 = time.perf_counter(), time.process_time()
        f.update(live_t[i : i + 1], live_v[i : i + 1])
        f.forecast(10, quantiles=(0.5, 0.95))
        steady.append(time.perf_counter() - t0)
        steady_cpu.append(time.process_time() - c0)
    steady_ms, steady_cpu_ms = np.array(steady) * 1000, np.array(steady_cpu) * 1000
    refits = int(live_t.size * 60 / f.refit_every_s)
    # A lighter steady-state: the profile model alone (what auto picks on many series anyway).
    g = Forecaster("profile_day", 60.0).fit(ts, vs)
    g.forecast(10)
    light, light_cpu = [], []
    for i in range(live_t.size):
        t0, c0 = time.perf_counter(), time.process_time()
        g.update(live_t[i : i + 1], live_v[i : i + 1])
        g.forecast(10, quantiles=(0.5, 0.95))
        light.append(time.perf_counter() - t0)
        light_cpu.append(time.process_time() - c0)
    light_ms, light_cpu_ms = np.array(light) * 1000, np.array(light_cpu) * 1000

    tracemalloc.start()
    m = Forecaster("auto", 60.0).fit(ts, vs)
    m.forecast(10, quantiles=(0.5, 0.95))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pickled = len(pickle.dumps(m))

    def ms(a: np.ndarray) -> str:
        return f"median {np.median(a):.2f} ms, p99 {np.percentile(a, 99):.1f} ms, max {a.max():.1f} ms, mean {a.mean():.2f} ms"

    return "\n".join(
        [
            "| measure | figure | target |",
            "| --- | --- | --- |",
            f"| fit, 14 days of 1-min data (20,160 points; NASA HTTP) | median {statistics.median(fits) * 1000:.1f} ms "
            f"(min {min(fits) * 1000:.1f}) | <= 0.5 s |",
            f"| fit + first forecast (runs the calibration backtest, picks `{model}`) | median "
            f"{statistics.median(firsts):.3f} s (min {min(firsts):.3f} s) wall; CPU median "
            f"{statistics.median(firsts_cpu):.3f} s | <= 0.5 s |",
            f"| update (1 sample) + forecast, auto, {live_t.size} calls incl. {refits} hourly refits, wall | "
            f"{ms(steady_ms)} | p99 <= 20 ms |",
            f"| the same, CPU time of the process (what the call costs, without waiting for a core) | "
            f"{ms(steady_cpu_ms)} | p99 <= 20 ms |",
            f"| update (1 sample) + forecast, profile_day only, wall | {ms(light_ms)} | p99 <= 20 ms |",
            f"| the same, CPU time | {ms(light_cpu_ms)} | p99 <= 20 ms |",
            f"| peak traced memory during fit + first forecast | {peak / 1e6:.1f} MB | - |",
            f"| fitted model, pickled | {pickled / 1e6:.2f} MB | - |",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-origins", type=int, default=2000, help="origins per backtest, thinned evenly")
    ap.add_argument("--no-record", action="store_true", help="print, do not write BENCHMARKS.md")
    ap.add_argument("--skip-real", action="store_true", help="only speed and memory")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if not args.skip_real:
        table, ok = real_series(args.max_origins)
        body = "\n".join(
            [
                f"Rolling origin over the second half of each series, <= {args.max_origins} origins per run "
                "(evenly thinned), the model refitted at most 24 times per run and recalibrated daily in "
                "between (production refits hourly). The NYC taxi step is 30 min, so both horizons are one step.",
                "",
                table,
                "",
                f"{sum(ok)}/{len(ok)} runs meet both targets (coverage 93-97%, pinball <= 0.8x seasonal naive). "
                "Seasonal naive is scored as its raw peak, max(path), as it would be used without calibration.",
            ]
        )
        if not args.no_record:
            record("forecast-real", "Forecast: 95% peak quantile on real demand (coverage, pinball)", body)
    speed = speed_and_memory()
    print(speed)
    body = "\n".join(
        [
            "The machine is shared with other engineers' test and benchmark processes while this ran (load "
            f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end), so timings are noisy and "
            "pessimistic; the minimum is the closest to an idle machine. Memory is what tracemalloc sees "
            "(Python and numpy allocations; scikit-learn's native buffers are not traced).",
            "",
            speed,
            "",
            "Before the refit was spread over calls and the live gbm prediction walked the trees in numpy "
            "(commit 6688c98, same command, wall time only): update + forecast, auto: median 2.34 ms, p99 "
            "33.1 ms, max 338.2 ms. The max left is the per-series gbm's daily refit, one slice of its own "
            "(scikit-learn's boosting cannot be cut smaller without re-binning the data at every slice).",
        ]
    )
    if not args.no_record:
        record("forecast-speed", "Forecast: speed and memory on one core", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
