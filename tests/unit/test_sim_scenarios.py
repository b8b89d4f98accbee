"""`simulate()` on small scripted traces with known answers: a step up, a step down, a spike shorter than the
lead time; seeded determinism; the oracle's lower bound; streams conserved."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from controller import policy
from emulation import results, simulate, traces
from tests.fakes import specs

START = dt.datetime(2024, 5, 13, tzinfo=dt.UTC)
TOKENS = 90
"""90 tokens at 30 ms: every stream lasts 2.7 s, so concurrency is exactly rate x 2.7 (rounded up)."""


def spec() -> policy.ScalingPolicySpec:
    return specs.spec(
        gpus_per_replica=1,
        gpus_per_node=2,
        seconds_per_token=0.03,
        min_replicas=1,
        max_replicas=40,
        lead_s=(360, 60, 120),
    )


def request_trace(tmp_path: Path, phases: list[tuple[float, float]], name: str = "trace.csv") -> traces.Trace:
    """A per-request trace: for each (minutes, requests per second), evenly spaced arrivals of TOKENS tokens."""
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    t = 0.0
    for minutes, rate in phases:
        end = t + minutes * 60.0
        step = 1.0 / rate
        while t < end - 1e-9:
            stamp = (START + dt.timedelta(seconds=t)).strftime("%Y-%m-%d %H:%M:%S.%f")
            rows.append(f"{stamp},100,{TOKENS}")
            t += step
        t = end
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return traces.read_trace(path)


def run(trace: traces.Trace, **kw: object) -> results.SimResult:
    return simulate.simulate(trace, spec(), policies=("forestall", "reactive", "reactive-ca"), **kw)  # type: ignore[arg-type]


def conserved(r: results.SimResult) -> None:
    for p in r.policies.values():
        assert p.arrived == p.completed + p.rejected + p.cut + p.running + p.queued, p.name


def test_step_up_known_oracle_figures_and_reactive_misses(tmp_path: Path) -> None:
    tr = request_trace(tmp_path, [(60, 1.0), (60, 8.0)])
    r = run(tr)
    conserved(r)
    pol = r.policies
    # 1/s x 2.7 s peaks at 3 streams: 1 replica; 8/s peaks at 22: 6 replicas; one GPU each.
    assert pol["oracle"].gpu_hours == pytest.approx(1 + 6, rel=0.01)
    # Whole 2-GPU nodes: 1 node, then 3 nodes requested 9 minutes before the step.
    assert pol["oracle-lead"].gpu_hours == pytest.approx(2 * (1 + 3 + 2 * 540 / 3600), rel=0.01)
    assert pol["oracle"].slo_attainment == 1.0
    for name in ("reactive", "reactive-ca"):
        assert pol[name].slo_attainment < 0.99, name  # nobody can see a step coming
        assert pol[name].wait_p99_s > 2.0
    # With nodes at once, HPA gets pods in minutes; through cluster-autoscaler it also waits for nodes.
    assert pol["reactive"].slo_attainment > pol["reactive-ca"].slo_attainment
    # After the step every simulated policy ends with enough Ready capacity for the 22 streams.
    for name in ("forestall", "reactive", "reactive-ca"):
        assert r.ready_streams[name][-1] >= 22, name


def test_step_down_forestall_drains_and_cuts_nothing_reactive_cuts(tmp_path: Path) -> None:
    tr = request_trace(tmp_path, [(60, 8.0), (60, 1.0)])
    r = run(tr)
    conserved(r)
    pol = r.policies
    assert pol["forestall"].cut == 0
    assert pol["reactive"].cut > 0  # the ReplicaSet removes pods that still carry streams
    assert pol["forestall"].slo_attainment == 1.0
    # Forestall came down to what 1/s needs (3 streams: one replica, plus its forecast margin).
    assert r.ready_streams["forestall"][-1] <= 2 * 4
    assert pol["forestall"].gpu_hours >= pol["oracle"].gpu_hours


def test_spike_shorter_than_the_lead_time_costs_reactive_ca_nodes_that_serve_nothing(tmp_path: Path) -> None:
    flat = request_trace(tmp_path, [(120, 1.0)], "flat.csv")
    spike = request_trace(tmp_path, [(60, 1.0), (3, 8.0), (57, 1.0)], "spike.csv")
    r_flat, r_spike = run(flat), run(spike)
    conserved(r_spike)
    ca_flat, ca_spike = r_flat.policies["reactive-ca"], r_spike.policies["reactive-ca"]
    # The spike is over before any new node is Ready: its streams wait or are rejected...
    spike_streams = 3 * 60 * 8
    assert ca_spike.arrived - ca_spike.met > 0.5 * spike_streams
    # ...and the nodes requested for it are billed for their lead time plus 10 minutes unneeded.
    assert ca_spike.gpu_hours > ca_flat.gpu_hours + 2 * (360 + 600) / 3600 * 0.9
    assert r_spike.policies["oracle-lead"].slo_attainment == 1.0
    assert r_spike.policies["oracle-lead"].gpu_hours > r_flat.policies["oracle-lead"].gpu_hours


def test_same_seed_same_table_other_seed_other_arrivals() -> None:
    tr = traces.read_trace(traces.bundled_trace_path())
    short = traces.Trace(
        kind="counts",
        start_s=tr.start_s,
        end_s=tr.start_s + 3600,
        source=tr.source,
        columns=tr.columns,
        step_s=tr.step_s,
        counts=tr.counts[:120] if tr.counts is not None else None,
    )
    a = simulate.simulate(short, spec(), scale=0.02, seed=5).to_json()
    b = simulate.simulate(short, spec(), scale=0.02, seed=5).to_json()
    c = simulate.simulate(short, spec(), scale=0.02, seed=6).to_json()
    assert a == b
    assert a["policies"] != c["policies"]


def test_the_oracle_holds_exactly_the_replicas_each_seconds_peak_needs(tmp_path: Path) -> None:
    """The yardstick every policy is divided by: enough capacity every second, never a replica more."""
    tr = request_trace(tmp_path, [(30, 2.0), (20, 6.0), (10, 12.0), (30, 3.0)])
    r = run(tr, seed=3)
    conserved(r)
    slots = spec().capacity.streams_per_replica
    ready, demand = r.ready_streams["oracle"], r.demand_per_s
    assert np.all(ready >= demand) and np.all(ready - demand < slots)
    oracle = r.policies["oracle"]
    assert oracle.gpu_hours == pytest.approx(ready.sum() / slots / 3600)  # one GPU per replica
    # Whole nodes a lead time ahead cost more; so do the policies that must guess the lead time.
    assert r.policies["oracle-lead"].gpu_hours > oracle.gpu_hours
    for name in ("forestall", "reactive", "reactive-ca"):
        assert r.policies[name].gpu_hours > oracle.gpu_hours, name
