"""The decision, as one pure function: `decide(spec, now, history=, forecast=, signals=, state=) -> Plan`.

No I/O and no clock: time is the `now` argument, the demand history comes in `history`, the forecast of its
peak in `forecast`, what the balancer sees now in `signals`, and the cluster as a snapshot in `state`. The
live controller, the simulator and the tests all run this same code, at every reconcile, so it stays cheap
(no fitting, one binary search into the history, a few passes over the pods).

The forecast itself is computed by the caller (`controller.pipeline` fits and updates a `forecast` model
through `controller.forecasting` and passes the peak quantile over the horizon as `forecast`), because fitting
is the expensive part and the caller can cache it across reconciles; `decide` only reads it and judges its
freshness. `horizon_s()` tells the caller which horizon to forecast.

How it decides (every branch adds a `Reason`):

- **Serving target.** Replicas that should take new streams = the largest of the reactive floor (what demand
  needs right now: balancer active streams plus the admission queue, or the newest history sample), the
  forecast quantile of the peak over the horizon, and the hotspot floor; clamped to `replicas.min/max`.
  The forecast only ever raises capacity above the floor. Backend-reported waiting (`queued_streams`) is not
  added: the balancer counts a stream as active from pick to last byte, so those are already in it.
- **Horizon.** Node provisioning + pod start + model load, each measured (`ClusterState.measured_*`) when the
  controller has measured it and the policy's prior otherwise; `leadTime.horizonSeconds` when nothing has been
  measured yet and the operator set it.
- **Capacity already on its way counts.** Serving replicas = `spec_replicas` minus pods marked for draining, so
  pods pending or starting are never added twice.
- **Whole nodes** (`controller.sizing`): a GPU node is billed until its last pod goes, so the bill is in
  nodes. Scale-up does not open a node for a sliver of the forecast: when the target exceeds what the nodes
  already running (or coming for) the target hold by at most `sizing.NODE_TOLERANCE` of them (and less than
  a node), it is held at what they hold (`NodeTolerance`): the forecast's upper quantile already carries a
  margin, and those replicas would cost a whole node for a full lead time. What demand needs now is never
  held back. Scale-down drains only pods whose nodes it can
  empty (`WholeNodeHold` otherwise): a pod drained from a node that stays saves nothing.
- **Scale-down** needs all demand data fresh, a history that covers the stabilization window with at least
  `MIN_FINITE_FRACTION` of its samples present (else `HistorySparse`: hold), and the most
  replicas any sample in that window needed (and the forecast) to stay below the serving count. At most
  `maxPodsPerMinute` pods are marked per minute (counted from the drain marks' start times). Pods not yet on
  a node go first, then every pod of the node with the fewest of the target's serving pods (fewest streams
  on it among equals), as long as the surplus covers the whole node; within a node pending before starting
  before ready, then fewest active streams and sessions, newest first. (In `forestall simulate` at peak 400
  on NASA's first two days, whole-node draining took SLO attainment from 99.71% to 99.97% and GPU-hours from
  1.27x to 1.22x `oracle-lead`, and scale events from 1,303 to 488; see BENCHMARKS.md.) They are marked
  (`Plan.drain`), and removed (`Plan.remove` with the lowest deletion cost) once empty or at the drain
  timeout, but never before `MIN_DRAIN_S`: the balancers must see the mark before the pod goes, and a
  marked pod staying visible that long keeps the per-minute count exact.
- **Undrain** when demand comes back: marked pods are returned to service before any new pod is added.
- **Hotspots.** A backend the balancer flags hot (sustained) whose load is session-bound cannot be cooled by
  rebalancing: its pinned sessions stay. Each such backend counts as a whole replica of its own and the rest
  of demand is spread over the others, which can raise the target (`HotspotCapacity`).
- **Missing or stale data** (history, the forecast, or signals when `demand.balancer` is set): hold. Never
  below current capacity or any fresh demand figure, no new drains, no removals, marked pods undrained,
  provisioned GPUs kept; `demand_data_available=False` with the reason.
- **Mixed GPU pools.** With `capacity.gpuTypes`, capacity is counted in replicas of `streamsPerReplica`: a
  pod on a node labelled (`nvidia.com/gpu.product`) with a listed type counts for that type's streams per
  replica, pods elsewhere or not yet placed for one. New pods are counted at `streamsPerReplica` (the
  scheduler picks their node), so list the smallest type's capacity there. `Plan.capacity_weight` carries
  each pod's ratio to the balancers as its `forestall.dev/capacity-weight` annotation.
- **Provisioner.** With `provisioner.type: pods` the replicas themselves are the lead (pending pods drive
  Karpenter or cluster-autoscaler) and `provision_gpus` is 0. With a buffer, placeholder or provisioning
  request, replicas follow the peak over the pod horizon only (pod start + model load, read off the
  forecast path) and GPUs for the rest of the full-horizon peak are held through the provisioner.

What it does not do: fit forecasts, read clocks or APIs, or apply anything (`controller.pipeline` applies the
`Plan` through `controller.acting`). Hot backends that are not session-bound are left to the balancer.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from contract import signals as signals_mod
from controller import cluster, policy, sizing


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
    """Concurrent-stream demand at a fixed step, newest last."""

    step_s: float
    timestamps: npt.NDArray[np.float64]
    """Unix times of the samples, increasing."""

    values: npt.NDArray[np.float64]
    """Concurrent streams at each timestamp; NaN where missing."""

    fetched_s: float | None = None
    """Unix time the history was last read successfully (None: never); old means Prometheus is gone."""


@dataclass(frozen=True)
class SignalsSnapshot:
    """What all balancer replicas report now, merged per backend (`contract.signals.merge`)."""

    time_s: float
    """Unix time of the oldest report that went into the merge."""

    backends: Mapping[str, signals_mod.BackendSignals]
    admission_queue: int = 0
    rejected_streams_total: int = 0
    unreachable: tuple[str, ...] = ()
    """Balancer replicas that gave no usable report: the sums miss their streams, so they are a lower bound
    (used to scale up, never to scale down or to call a pod empty)."""

    @property
    def active_streams(self) -> int:
        return sum(b.active_streams for b in self.backends.values())


class ReasonCode(enum.StrEnum):
    """Every code a `Reason` can carry: CamelCase strings for Events, conditions and the metrics' `reason` label.

    A closed set (mypy checks each use), so the metrics label stays bounded and a typo is a type error.
    """

    REACTIVE_FLOOR = "ReactiveFloor"
    FORECAST_PEAK = "ForecastPeak"
    HOTSPOT_CAPACITY = "HotspotCapacity"
    CLAMPED_TO_MIN = "ClampedToMin"
    CLAMPED_TO_MAX = "ClampedToMax"
    SCALE_UP = "ScaleUp"
    UNDRAIN = "Undrain"
    SCALE_DOWN = "ScaleDown"
    STABILIZATION_WINDOW = "StabilizationWindow"
    SCALE_DOWN_RATE_LIMITED = "ScaleDownRateLimited"
    DRAIN_WAITING = "DrainWaiting"
    DRAIN_COMPLETE = "DrainComplete"
    DRAIN_TIMEOUT = "DrainTimeout"
    STEADY = "Steady"
    HISTORY_MISSING = "HistoryMissing"
    HISTORY_STALE = "HistoryStale"
    FORECAST_MISSING = "ForecastMissing"
    FORECAST_STALE = "ForecastStale"
    SIGNALS_MISSING = "SignalsMissing"
    SIGNALS_STALE = "SignalsStale"
    SIGNALS_INCOMPLETE = "SignalsIncomplete"
    HOLDING_CAPACITY = "HoldingCapacity"
    WHOLE_NODE_HOLD = "WholeNodeHold"
    """Surplus smaller than any node's serving pods: draining would release no node, so hold."""
    NODE_TOLERANCE = "NodeTolerance"
    """Scale-up held at what the running nodes hold: the extra would open a node for a sliver of forecast."""
    HISTORY_SPARSE = "HistorySparse"
    """Too few finite samples in the stabilization window to justify a scale-down: capacity held."""

    @property
    def missing_data(self) -> bool:
        """True for the codes that say an input was missing, stale or incomplete (capacity is then held)."""
        return self.value.endswith(("Missing", "Stale", "Incomplete"))


@dataclass(frozen=True)
class Reason:
    """Why a plan is what it is: a code (for events, conditions, metrics) and a sentence."""

    code: ReasonCode
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

    capacity_weight: Mapping[str, float] = field(default_factory=dict)
    """Pod -> `forestall.dev/capacity-weight` to set: its GPU type's streams per replica over
    `capacity.streamsPerReplica` (only with `capacity.gpuTypes`, only where the annotation differs)."""

    reasons: tuple[Reason, ...] = ()
    demand_data_available: bool = True
    """False when history, signals or the forecast were missing or stale (capacity was held, not lowered)."""

    forecast: PeakForecast | None = None
    observed_demand: float | None = None
    """Concurrent streams now, as decide() saw them."""


RATE_WINDOW_S = 60.0
"""`scaleDown.maxPodsPerMinute` counts drain marks set within this window."""

MIN_FINITE_FRACTION = 0.75
"""Scale-down needs at least this share of the stabilization window's samples present: one fresh sample
among gaps (a Prometheus restart, a scrape outage) must not justify a drain. A quarter missing still lets a
few failed scrapes pass."""

MIN_DRAIN_S = RATE_WINDOW_S
"""A marked pod is removed no sooner than this: every balancer replica sees the mark (watch latency is
seconds) before the pod goes, and a mark stays visible for the whole rate window, so the count is exact."""

SESSION_BOUND_FRACTION = 0.5
"""A hot backend is session-bound (rebalancing cannot cool it) when it holds at least this many open
sessions per active stream: new sessionless streams already avoid it, pinned sessions keep coming back."""

_EPS = 1e-9
"""Slack so that 32.0 streams at 16 per replica is 2 replicas, not 3, after float arithmetic."""

_INT32_MIN = -(2**31)
"""Lowest value `controller.kubernetes.io/pod-deletion-cost` accepts (it is an int32)."""

REASON_CODES: tuple[ReasonCode, ...] = tuple(ReasonCode)
"""Every `Reason.code` a plan can carry (fixed, so metrics can label by it without unbounded cardinality)."""

_MOVING = frozenset(
    {ReasonCode.SCALE_UP, ReasonCode.UNDRAIN, ReasonCode.SCALE_DOWN, ReasonCode.HOLDING_CAPACITY}
)
"""Codes of a plan that changes serving capacity; a plan with none of them (and no removal) is `Steady`."""

_PHASE_RANK = {"pending": 0, "starting": 1, "ready": 2, "terminating": 3}
"""Cheapest pods to lose first: pending ones serve nothing and may be holding a node request open."""


def horizon_s(spec: policy.ScalingPolicySpec, state: cluster.ClusterState) -> float:
    """The forecast horizon: measured node + pod + model-load lead times, the policy's priors where unmeasured.

    `leadTime.horizonSeconds`, when set, stands in for the priors until the controller has measured a stage.
    """
    lead = spec.lead_time
    measured = (state.measured_node_provisioning_s, state.measured_pod_start_s, state.measured_model_load_s)
    if all(m is None for m in measured):
        return lead.total_s
    return _or(measured[0], lead.node_provisioning_s) + pod_horizon_s(spec, state)


def pod_horizon_s(spec: policy.ScalingPolicySpec, state: cluster.ClusterState) -> float:
    """Pod start + model load (measured or prior): how far ahead a pod must be created on a ready node."""
    lead = spec.lead_time
    return _or(state.measured_pod_start_s, lead.pod_start_s) + _or(
        state.measured_model_load_s, lead.model_load_s
    )


def replicas_for(streams: float, streams_per_replica: int) -> int:
    """Replicas needed to carry `streams` concurrent streams (0 for no demand)."""
    if not math.isfinite(streams) or streams <= 0:
        return 0
    return math.ceil(streams / streams_per_replica - _EPS)


@dataclass(frozen=True)
class _Inputs:
    """The freshness verdict on the inputs and the figures taken from the fresh ones."""

    missing: tuple[Reason, ...]
    observed: float | None
    floor_replicas: int
    forecast: PeakForecast | None
    pod_load: Mapping[str, int]
    """Pod name -> active streams + open sessions, from fresh signals; empty when signals are not fresh."""

    signals_fresh: bool
    signals_complete: bool
    """Every balancer replica answered: a pod at zero is idle (with replicas missing it may not be)."""


def decide(
    spec: policy.ScalingPolicySpec,
    now: float,
    *,
    history: DemandHistory | None,
    forecast: PeakForecast | None,
    signals: SignalsSnapshot | None,
    state: cluster.ClusterState,
) -> Plan:
    """Decide replicas, pre-provisioned GPUs, drains and annotations for one policy at time `now`.

    History is required whatever its source (the stabilization window is read from it; a controller
    without Prometheus builds it from the signals it collects), the forecast of its peak over `horizon_s()`
    too, and signals when the policy names a balancer. See the module docstring for the rules.
    """
    spr = spec.capacity.streams_per_replica
    lo, hi = spec.replicas.min, spec.replicas.max
    inputs = _read_inputs(spec, now, history, forecast, signals)
    reasons: list[Reason] = []

    # What should serve, before stabilization.
    wanted = inputs.floor_replicas
    if inputs.observed is not None:
        reasons.append(
            Reason(
                ReasonCode.REACTIVE_FLOOR,
                f"current demand of {inputs.observed:g} streams needs {inputs.floor_replicas} replicas "
                f"at {spr} streams each",
            )
        )
    hot = _hotspot_replicas(signals, inputs, spr)
    if hot is not None and hot[0] > wanted:
        wanted = hot[0]
        reasons.append(Reason(ReasonCode.HOTSPOT_CAPACITY, hot[1]))
    full_peak_replicas = 0
    if inputs.forecast is not None:
        fc = inputs.forecast
        full_peak_replicas = replicas_for(fc.value, spr)
        peak_replicas = full_peak_replicas
        horizon_note = f"over the next {fc.horizon_s:g} s"
        if spec.provisioner.type != "pods" and fc.path:
            short = pod_horizon_s(spec, state)
            steps = max(1, math.ceil(len(fc.path) * min(1.0, short / fc.horizon_s) - _EPS))
            peak_replicas = min(full_peak_replicas, replicas_for(max(fc.path[:steps]), spr))
            horizon_note = f"over the pod horizon of {short:g} s (nodes held for {fc.horizon_s:g} s)"
        if peak_replicas > wanted:
            wanted = peak_replicas
            reasons.append(
                Reason(
                    ReasonCode.FORECAST_PEAK,
                    f"forecast q{fc.quantile:g} peak of {fc.value:g} streams {horizon_note} needs "
                    f"{peak_replicas} replicas",
                )
            )
    target = _clamp(wanted, lo, hi, reasons, what="demand")

    live = [p for p in state.pods if p.phase != "terminating"]
    draining = [p for p in live if p.drain_started_s is not None]
    serving_now = max(0, state.spec_replicas - len(draining))
    weights = sizing.replica_weights(spec, state)
    # Capacity in replicas of `streamsPerReplica`: a pod on a GPU type listed in capacity.gpuTypes counts for
    # its own streams per replica (pods on unlisted types or not yet on a node count as one).
    serving_eq = serving_now + sum(weights.get(p.name, 1.0) - 1.0 for p in live if p.drain_started_s is None)
    available = not inputs.missing

    undrain: list[cluster.PodState] = []
    drain: list[cluster.PodState] = []
    new_pods = 0
    if available:
        # Only the forecast's margin is held back: what demand needs now (and hot backends) is never capped.
        now_need = max(inputs.floor_replicas, hot[0] if hot is not None else 0)
        held = max(sizing.within_node_tolerance(spec, state, target), min(now_need, target))
        if held < target:
            reasons.append(
                Reason(
                    ReasonCode.NODE_TOLERANCE,
                    f"demand and forecast need {target} replicas, {target - held} more than the target's nodes "
                    f"hold ({held}): within the {sizing.NODE_TOLERANCE:g} node tolerance, no node opened for them",
                )
            )
            target = held
    if not available:
        reasons[:0] = inputs.missing  # the first reason says why capacity is held
        undrain = list(draining)
        held = max(target, state.spec_replicas)
        new_pods = held - state.spec_replicas
        reasons.append(
            Reason(
                ReasonCode.HOLDING_CAPACITY,
                f"demand data incomplete: holding {held} replicas (no drains, no removals"
                + (f", {len(undrain)} drained pods returned to service" if undrain else "")
                + ")",
            )
        )
    elif target > serving_eq + _EPS:
        deficit = target - serving_eq
        # Back first: pods on the fullest nodes (the emptying ones stay on course), then those with most streams.
        per_node: dict[str | None, int] = {}
        for p in live:
            per_node[p.node] = per_node.get(p.node, 0) + 1
        undrain = sorted(
            draining,
            key=lambda p: (
                -(per_node[p.node] if p.node is not None else 1),
                -inputs.pod_load.get(p.name, 0),
                -(p.drain_started_s or 0),
                p.name,
            ),
        )
        back = 0
        for p in undrain:
            if deficit <= _EPS:
                break
            deficit -= weights.get(p.name, 1.0)
            back += 1
        undrain = undrain[:back]
        new_pods = math.ceil(deficit - _EPS) if deficit > _EPS else 0
        if undrain:
            reasons.append(
                Reason(
                    ReasonCode.UNDRAIN, f"demand came back: returning {len(undrain)} draining pods to service"
                )
            )
        if new_pods:
            reasons.append(
                Reason(ReasonCode.SCALE_UP, f"scaling up from {serving_now} to {target} serving replicas")
            )
    else:
        drain = _scale_down(
            spec,
            now,
            history,
            state,
            target=target,
            serving_now=serving_eq,
            live=live,
            weights=weights,
            inputs=inputs,
            reasons=reasons,
        )

    # Removals: marked pods that are empty or past the drain timeout (never with missing data).
    kept_draining = [p for p in draining if p not in undrain]
    remove: list[cluster.PodState] = []
    if available:
        remove = _removable(spec, now, kept_draining, inputs, reasons)

    desired = state.spec_replicas + new_pods - len(remove)
    if not any(r.code in _MOVING for r in reasons) and not remove:
        reasons.append(
            Reason(ReasonCode.STEADY, f"{serving_now} serving replicas cover demand and the forecast")
        )

    return Plan(
        desired_replicas=desired,
        provision_gpus=_provision(
            spec, state, available=available, target=target, full_peak=full_peak_replicas
        ),
        drain=tuple(p.name for p in drain),
        undrain=tuple(p.name for p in undrain),
        remove=tuple(p.name for p in remove),
        deletion_cost=_deletion_costs(live, remove),
        do_not_disrupt=_do_not_disrupt(live, inputs, remove),
        capacity_weight=sizing.weight_annotations(spec, live, weights),
        reasons=tuple(reasons),
        demand_data_available=available,
        forecast=inputs.forecast,
        observed_demand=inputs.observed,
    )


def _read_inputs(
    spec: policy.ScalingPolicySpec,
    now: float,
    history: DemandHistory | None,
    peak: PeakForecast | None,
    signals: SignalsSnapshot | None,
) -> _Inputs:
    """Judge each input fresh or not and take the current demand from the fresh ones."""
    stale_s = spec.demand.stale_after_s
    missing: list[Reason] = []
    demands: list[float] = []
    forecast: PeakForecast | None = None

    last_ts: float | None = None
    if history is None or history.values.size == 0:
        missing.append(Reason(ReasonCode.HISTORY_MISSING, "no demand history has been read yet"))
    else:
        i = _last_finite(history.values)
        if i is None:
            missing.append(
                Reason(ReasonCode.HISTORY_MISSING, "the demand history holds no samples (all missing)")
            )
        else:
            last_ts = float(history.timestamps[i])
            fetched = history.fetched_s if history.fetched_s is not None else last_ts
            data_age = now - last_ts
            if now - fetched > stale_s:
                missing.append(
                    Reason(
                        ReasonCode.HISTORY_STALE,
                        f"demand history last read {now - fetched:.0f} s ago (stale after {stale_s:g} s)",
                    )
                )
            elif data_age > stale_s + 2 * history.step_s:  # a step's sample may be stamped at its start
                missing.append(
                    Reason(
                        ReasonCode.HISTORY_STALE,
                        f"newest demand sample is {data_age:.0f} s old (stale after {stale_s:g} s)",
                    )
                )
            else:
                demands.append(max(0.0, float(history.values[i])))
        fc = peak  # judged only beside a history: without one, HistoryMissing already holds
        if fc is None:
            missing.append(Reason(ReasonCode.FORECAST_MISSING, "no forecast of the peak over the horizon"))
        else:
            made = fc.computed_s if fc.computed_s > 0 else (history.fetched_s or last_ts or 0.0)
            if now - made > stale_s or not math.isfinite(fc.value):
                missing.append(
                    Reason(
                        ReasonCode.FORECAST_STALE,
                        f"forecast made {now - made:.0f} s ago (stale after {stale_s:g} s)",
                    )
                )
            else:
                forecast = fc

    pod_load: dict[str, int] = {}
    signals_fresh = False
    if signals is None:
        if spec.demand.balancer is not None:
            missing.append(Reason(ReasonCode.SIGNALS_MISSING, "no balancer replica's /signals could be read"))
    elif now - signals.time_s > stale_s:
        missing.append(
            Reason(
                ReasonCode.SIGNALS_STALE,
                f"balancer signals are {now - signals.time_s:.0f} s old (stale after {stale_s:g} s)",
            )
        )
    else:
        signals_fresh = True
        if signals.unreachable:
            missing.append(
                Reason(
                    ReasonCode.SIGNALS_INCOMPLETE,
                    f"{len(signals.unreachable)} balancer replicas gave no usable report "
                    f"({', '.join(signals.unreachable[:3])}): their streams are missing from the sums",
                )
            )
        demands.append(float(signals.active_streams + signals.admission_queue))
        for b in signals.backends.values():
            if b.pod is not None:
                pod_load[b.pod] = pod_load.get(b.pod, 0) + b.active_streams + b.open_sessions

    observed = max(demands) if demands else None
    floor = replicas_for(observed, spec.capacity.streams_per_replica) if observed is not None else 0
    complete = signals_fresh and signals is not None and not signals.unreachable
    return _Inputs(tuple(missing), observed, floor, forecast, pod_load, signals_fresh, complete)


def _hotspot_replicas(signals: SignalsSnapshot | None, inputs: _Inputs, spr: int) -> tuple[int, str] | None:
    """Replicas needed when session-bound hot backends cannot shed load: one each, the rest spread evenly."""
    if signals is None or not inputs.signals_fresh:
        return None
    hot = [
        b
        for b in signals.backends.values()
        if b.hotspot and b.open_sessions > 0 and b.open_sessions >= SESSION_BOUND_FRACTION * b.active_streams
    ]
    if not hot:
        return None
    hot_streams = sum(b.active_streams for b in hot)
    rest = max(0.0, (inputs.observed or 0.0) - hot_streams)
    need = len(hot) + replicas_for(rest, spr)
    names = ", ".join(
        f"{b.pod or b.address} ({b.open_sessions} sessions, {b.active_streams} streams)" for b in hot[:3]
    )
    more = f" and {len(hot) - 3} more" if len(hot) > 3 else ""
    return need, (
        f"{len(hot)} hot backends are session-bound and rebalancing cannot move their sessions: {names}{more}; "
        f"{need} replicas keep the rest of demand within capacity"
    )


def _clamp(wanted: int, lo: int, hi: int, reasons: list[Reason], *, what: str) -> int:
    if wanted < lo:
        reasons.append(
            Reason(ReasonCode.CLAMPED_TO_MIN, f"{what} needs {wanted} replicas, replicas.min is {lo}")
        )
        return lo
    if wanted > hi:
        reasons.append(
            Reason(ReasonCode.CLAMPED_TO_MAX, f"{what} needs {wanted} replicas, replicas.max is {hi}")
        )
        return hi
    return wanted


def _scale_down(
    spec: policy.ScalingPolicySpec,
    now: float,
    history: DemandHistory | None,
    state: cluster.ClusterState,
    *,
    target: int,
    serving_now: float,
    live: Sequence[cluster.PodState],
    weights: Mapping[str, float],
    inputs: _Inputs,
    reasons: list[Reason],
) -> list[cluster.PodState]:
    """Pods to mark for draining now: after the window, below the forecast, within the per-minute budget."""
    if target >= serving_now - _EPS:
        return []
    assert history is not None  # available data implies a history
    spr = spec.capacity.streams_per_replica
    window = spec.scale_down.stabilization_window_s
    ts, vs = history.timestamps, history.values
    if window > 0 and (ts.size == 0 or float(ts[0]) > now - window + history.step_s):
        covered = now - float(ts[0]) if ts.size else 0.0
        reasons.append(
            Reason(
                ReasonCode.STABILIZATION_WINDOW,
                f"holding {serving_now:g} replicas: history covers {covered:.0f} s of the {window:g} s "
                "stabilization window",
            )
        )
        return []
    start = int(np.searchsorted(ts, now - window, side="left"))
    recent = vs[start:]
    present = float(np.isfinite(recent).mean()) if recent.size else 0.0
    if window > 0 and present < MIN_FINITE_FRACTION:
        reasons.append(
            Reason(
                ReasonCode.HISTORY_SPARSE,
                f"holding {serving_now} replicas: only {present:.0%} of the samples in the last {window:g} s "
                f"are present (scale-down needs {MIN_FINITE_FRACTION:.0%})",
            )
        )
        return []
    recent = recent[np.isfinite(recent)]
    window_need = replicas_for(float(recent.max()), spr) if recent.size else 0
    floor = max(target, min(window_need, spec.replicas.max))
    if floor >= serving_now - _EPS:
        reasons.append(
            Reason(
                ReasonCode.STABILIZATION_WINDOW,
                f"holding {serving_now:g} replicas: demand needed {window_need} within the last {window:g} s",
            )
        )
        return []
    recent_marks = sum(
        1 for p in state.pods if p.drain_started_s is not None and now - p.drain_started_s < RATE_WINDOW_S
    )
    budget = spec.scale_down.max_pods_per_minute - recent_marks
    excess = serving_now - floor
    if budget <= 0:
        reasons.append(
            Reason(
                ReasonCode.SCALE_DOWN_RATE_LIMITED,
                f"{excess:g} replicas surplus, but {recent_marks} pods were marked in the last minute "
                f"(scaleDown.maxPodsPerMinute={spec.scale_down.max_pods_per_minute})",
            )
        )
        return []
    serving = [p for p in live if p.drain_started_s is None]
    known = {n.name for n in state.nodes}
    node_load: dict[str, int] = {}
    for p in serving:
        if p.node is not None:
            key = p.node if p.node in known else f"pod/{p.name}"
            node_load[key] = node_load.get(key, 0) + inputs.pod_load.get(p.name, 0)
    planned = sizing.drain_whole_nodes(
        serving,
        excess=excess,
        weight=lambda p: weights.get(p.name, 1.0),
        order=lambda p: (_PHASE_RANK[p.phase], inputs.pod_load.get(p.name, 0), -p.created_s, p.name),
        node_rank=node_load,
        known_nodes=known,
        whole_nodes=spec.scale_down.whole_nodes,
    )
    if (
        state.removal_order == "highest-ordinal"
    ):  # a StatefulSet removes its highest ordinals, whatever we drain
        planned = sorted(serving, key=lambda p: -_ordinal(p.name))[: math.floor(excess + _EPS)]
    chosen = planned[:budget]
    if not chosen and excess > 0:
        reasons.append(
            Reason(
                ReasonCode.WHOLE_NODE_HOLD,
                f"{excess:g} replicas surplus, fewer than the serving pods of any node: draining them would "
                "release no node",
            )
        )
        return []
    if chosen:
        loads = ", ".join(f"{p.name} ({inputs.pod_load.get(p.name, 0)})" for p in chosen)
        reasons.append(
            Reason(
                ReasonCode.SCALE_DOWN,
                f"demand and forecast need {floor} replicas, {serving_now:g} serve: draining {loads}"
                + (
                    f"; {len(planned) - len(chosen)} more later (maxPodsPerMinute)"
                    if len(planned) > len(chosen)
                    else ""
                ),
            )
        )
    return chosen


def _ordinal(pod_name: str) -> int:
    """A StatefulSet pod's ordinal (`name-3` -> 3); -1 when the name has none."""
    tail = pod_name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _removable(
    spec: policy.ScalingPolicySpec,
    now: float,
    draining: Sequence[cluster.PodState],
    inputs: _Inputs,
    reasons: list[Reason],
) -> list[cluster.PodState]:
    """Marked pods that may go now: empty (or never ready) or past the drain timeout, and marked long enough."""
    timeout = spec.scale_down.drain_timeout_s
    out: list[cluster.PodState] = []
    waiting: list[str] = []
    for p in draining:
        started = p.drain_started_s
        assert started is not None
        age = now - started
        if age < MIN_DRAIN_S:
            waiting.append(p.name)
            continue
        load = inputs.pod_load.get(p.name)
        empty = p.phase in ("pending", "starting") or (
            inputs.signals_complete and load is not None and load == 0
        )
        if empty:
            out.append(p)
            reasons.append(
                Reason(ReasonCode.DRAIN_COMPLETE, f"{p.name} drained empty after {age:.0f} s: removing it")
            )
        elif age >= timeout:
            out.append(p)
            left = "an unknown number of" if load is None else str(load)
            reasons.append(
                Reason(
                    ReasonCode.DRAIN_TIMEOUT,
                    f"{p.name} still had {left} streams/sessions after the {timeout:g} s drain timeout: removing it",
                )
            )
        else:
            waiting.append(p.name)
    if waiting:
        reasons.append(
            Reason(
                ReasonCode.DRAIN_WAITING,
                f"waiting for {len(waiting)} draining pods to empty: {', '.join(waiting[:5])}",
            )
        )
    return out


def _deletion_costs(live: Sequence[cluster.PodState], remove: Sequence[cluster.PodState]) -> dict[str, int]:
    """Costs that make the ReplicaSet remove exactly `remove`: lower than every other pod's cost."""
    if not remove:
        return {}
    gone = {p.name for p in remove}
    kept = [_cost(p) for p in live if p.name not in gone]
    low = max(_INT32_MIN, min([0, *kept]) - 1)
    costs = {name: low for name in sorted(gone)}
    for p in live:  # a kept pod already at the floor (someone else's doing) is lifted just above it
        if p.name not in gone and _cost(p) <= low:
            costs[p.name] = low + 1
    return costs


def _cost(pod: cluster.PodState) -> int:
    try:
        return int(pod.annotations.get(cluster.DELETION_COST_ANNOTATION, "0"))
    except ValueError:
        return 0


def _do_not_disrupt(
    live: Sequence[cluster.PodState], inputs: _Inputs, remove: Sequence[cluster.PodState]
) -> dict[str, bool]:
    """True on pods carrying streams or sessions, False on idle ones; nothing when signals are not fresh."""
    if not inputs.signals_fresh:
        return {}
    gone = {p.name for p in remove}
    marks = {p.name: p.name not in gone and inputs.pod_load.get(p.name, 0) > 0 for p in live}
    if not inputs.signals_complete:  # zero from some replicas is not idle: only say True
        return {name: True for name, carries in marks.items() if carries}
    return marks


def _provision(
    spec: policy.ScalingPolicySpec,
    state: cluster.ClusterState,
    *,
    available: bool,
    target: int,
    full_peak: int,
) -> int:
    """GPUs to hold ahead through the provisioner: the full-horizon peak beyond the serving target."""
    if spec.provisioner.type == "pods":
        return 0
    wanted = max(0, min(full_peak, spec.replicas.max) - target) * spec.capacity.gpus_per_replica
    if not available:
        return max(wanted, state.provisioned_gpus)
    return wanted


def _last_finite(values: npt.NDArray[np.float64]) -> int | None:
    """Index of the newest non-NaN sample; looks at the tail first so a long history costs nothing."""
    for i in range(values.size - 1, max(-1, values.size - 9), -1):
        if math.isfinite(values[i]):
            return i
    finite = np.flatnonzero(np.isfinite(values))
    return int(finite[-1]) if finite.size else None


def _or(measured: float | None, prior: float) -> float:
    return prior if measured is None else measured
