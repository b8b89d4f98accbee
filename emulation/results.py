"""What a `forestall simulate` run (or a demo) produced: per-policy figures and the timelines the plot draws.

What this module does not do: compute them (`emulation.simulate`, `emulation.demo`) or print them
(`emulation.simulate_cli`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller import policy

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass
class PolicyResult:
    name: str
    arrived: int
    started: int
    completed: int
    rejected: int
    cut: int
    running: int
    queued: int
    met: int
    wait_p50_s: float
    wait_p99_s: float
    gpu_hours: float
    scale_events: int

    @property
    def slo_attainment(self) -> float:
        return self.met / self.arrived if self.arrived else 1.0


@dataclass
class SimResult:
    """Everything a run produced: per-policy figures and the timelines the plot draws."""

    trace: str
    start_s: float
    end_s: float
    scale: float
    seed: int
    spec: policy.ScalingPolicySpec
    policies: dict[str, PolicyResult]
    tick_t: FloatArray
    demand_per_s: IntArray
    ready_streams: dict[str, IntArray]
    """Policy -> stream slots on Ready pods at each tick (oracles: per second)."""
    misses: dict[str, IntArray]
    """Policy -> streams that missed the SLO at each tick: waited too long, were rejected, or were cut."""
    billed_gpus: dict[str, IntArray]
    """Simulated policy -> GPUs on nodes requested and not released, at each tick."""
    forecast: FloatArray
    """Forestall's forecast quantile of the peak at each tick (NaN when it had none)."""
    wall_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        oracle = self.policies["oracle"].gpu_hours
        lead = self.policies["oracle-lead"].gpu_hours
        return {
            "policies": {
                name: {
                    "slo_attainment": r.slo_attainment,
                    "wait_p50_s": r.wait_p50_s,
                    "wait_p99_s": r.wait_p99_s,
                    "streams_arrived": r.arrived,
                    "streams_rejected": r.rejected,
                    "streams_cut": r.cut,
                    "gpu_hours": r.gpu_hours,
                    "gpu_hours_vs_oracle": r.gpu_hours / oracle if oracle > 0 else None,
                    "gpu_hours_vs_oracle_lead": r.gpu_hours / lead if lead > 0 else None,
                    "scale_events": r.scale_events,
                }
                for name, r in self.policies.items()
            },
            "trace": self.trace,
            "duration_s": self.end_s - self.start_s,
            "scale": self.scale,
            "seed": self.seed,
            "slo_time_to_first_token_s": self.spec.slo.time_to_first_token_s,
            "streams_per_replica": self.spec.capacity.streams_per_replica,
            "lead_time_s": self.spec.lead_time.total_s,
            "wall_s": self.wall_s,
        }
