"""The demo's simulated rows start where the live run started and replay the streams it sent.

Regressions: the simulated Forestall row used to draw its own streams and start without the live run's
history; with the history, its steps were offset from the history's grid and the forecaster refused it.
"""

from __future__ import annotations

import random

import numpy as np

from emulation import demo, runners, sim, simulate, streams, traces

NOW = 1_700_000_000.0


def test_the_simulated_rows_replay_exactly_the_streams_the_live_run_sent() -> None:
    spec = simulate.default_spec()
    sent = [(NOW + 0.5 * i, 8 * (1 + i % 5)) for i in range(400)]
    stats = demo.StreamStats(sent=list(reversed(sent)))  # tasks may record out of order
    bundled = traces.read_trace(traces.bundled_trace_path())
    trace = demo._sent(stats, bundled, NOW, NOW + 300.0)
    assert trace.kind == "requests" and trace.arrival_s is not None and trace.tokens is not None
    assert trace.arrival_s.tolist() == [t for t, _ in sent]
    assert trace.tokens.tolist() == [float(n) for _, n in sent]
    result = simulate.simulate(trace, spec, policies=("forestall",), scale=1.0, seed=0, initial_replicas=2)
    assert result.policies["forestall"].arrived == len(sent)


def test_a_prior_history_off_the_run_grid_still_gives_a_forecast() -> None:
    """The demo window starts on the trace's 30 s steps; the seeded history ends on its own 60 s grid."""
    spec = simulate.default_spec()
    step = spec.forecast.step_s
    prior_t = NOW - 30.0 - step * np.arange(600, 0, -1, dtype=np.float64) + step
    prior_v = 20.0 + 5.0 * np.sin(np.arange(600) / 60.0)
    start = NOW
    c = sim.SimCluster(spec, seed=0, start_s=start, node_release_after_s=30.0)
    c.bootstrap(2)
    book = streams.StreamBook(slo_s=2.0, rng=random.Random(0))
    runner = runners.ForestallRunner(
        "forestall", spec, c, book, start_s=start, end_s=start + 3600, prior=(prior_t, prior_v)
    )
    for k in range(12):  # three minutes of ticks: several new steps folded into the fitted forecaster
        now = start + 15.0 * k
        c.advance(now)
        runner.reconcile(now, 22.0)
        assert runner.peak is not None, runner.pipeline.forecast_.error_
    assert runner.h_t[runner.m] == prior_t[-1] + step
