"""The decision, as one pure function: `decide(policy, now, history, signals, cluster_state) -> Plan`.

No I/O and no clock: time is the `now` argument, demand history and its forecast come in `history`, what the
balancer sees now comes in `signals`, and the cluster comes as a snapshot. The live controller, the simulator
and the tests all run this same code.

The forecast itself is computed by the caller (the loop or the simulator fits and updates a
`forecast` model and passes the peak quantile over the horizon in `history.forecast`), because fitting is the
expensive part and the caller can cache it across reconciles; `decide` only reads it.

(Body: see the controller issue; this module's types are the seam other components code against.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from balancer import signals as signals_mod
from controller import cluster, policy


@dataclass(frozen=True)
class PeakForecast:
    """The forecast quantile of the peak of concurrent streams over the horizon, as computed by the caller."""

    value: float
    """Streams: the `quantile` quantile of max(demand) over the next `horizon_s` seconds."""

    quantile: float
    horizon_s: float
    model: str = ""
    computed_s: float = 0.0
    """Unix time the forecast was made (it is stale after `policy.spec.demand.stale_after_s`)."""

    path: tuple[float, ...] = ()
    """Optional per-step forecast of the same quantile over the horizon, for plots and status."""


@dataclass(frozen=True)
class DemandHistory:
    """Concurrent-stream demand at a fixed step, newest last, plus the caller's forecast of its peak."""

    step_s: float
    timestamps: npt.NDArray[np.float64]
    """Unix times of the samples, increasing."""

    values: npt.NDArray[np.float64]
    """Concurrent streams at each timestamp; NaN where missing."""

    forecast: PeakForecast | None = None
    fetched_s: float | None = None
    """Unix time the history was last read successfully (None: never); old means Prometheus is gone."""


@dataclass(frozen=True)
class SignalsSnapshot:
    """What all balancer replicas report now, merged per backend (`balancer.signals.merge`)."""

    time_s: float
    """Unix time of the oldest report that went into the merge."""

    backends: Mapping[str, signals_mod.BackendSignals]
    admission_queue: int = 0
    rejected_streams_total: int = 0

    @property
    def active_streams(self) -> int:
        return sum(b.active_streams for b in self.backends.values())


@dataclass(frozen=True)
class Reason:
    """Why a plan is what it is: a CamelCase code (for events, conditions, metrics) and a sentence."""

    code: str
    message: str


@dataclass(frozen=True)
class Plan:
    """What the controller should make true now. Applying the same plan twice changes nothing."""

    desired_replicas: int
    provision_gpus: int = 0
    """GPU capacity to hold ahead of demand through the provisioner (beyond what desired replicas use)."""

    drain: tuple[str, ...] = ()
    """Pods to mark for draining now (fewest active streams and sessions first)."""

    undrain: tuple[str, ...] = ()
    """Pods whose drain mark should be removed (demand came back before they left)."""

    remove: tuple[str, ...] = ()
    """Drained pods to remove now (empty, or drain timeout passed): deletion cost set, then scale down."""

    deletion_cost: Mapping[str, int] = field(default_factory=dict)
    """Pod -> `controller.kubernetes.io/pod-deletion-cost` to set (lowest goes first)."""

    do_not_disrupt: Mapping[str, bool] = field(default_factory=dict)
    """Pod -> whether it should carry `karpenter.sh/do-not-disrupt: "true"` (True while it carries streams)."""

    reasons: tuple[Reason, ...] = ()
    demand_data_available: bool = True
    """False when history, signals or the forecast were missing or stale (capacity was held, not lowered)."""

    forecast: PeakForecast | None = None
    observed_demand: float | None = None
    """Concurrent streams now, as decide() saw them."""


def decide(
    spec: policy.ScalingPolicySpec,
    now: float,
    history: DemandHistory | None,
    signals: SignalsSnapshot | None,
    state: cluster.ClusterState,
) -> Plan:
    """Decide replicas, pre-provisioned GPUs, drains and annotations for one policy at time `now`."""
    raise NotImplementedError("decide() lands with the controller issue")
