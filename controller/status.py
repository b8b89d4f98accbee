"""What a reconcile tells the user: the ScalingPolicy status, its conditions, the Event texts and the metrics.

`StatusReporter` is the Kubernetes loop's `controller.pipeline.Reporter`: from each `pipeline.Outcome` it
builds the `ScalingPolicyStatus` (conditions Ready, DemandDataAvailable, Forecasting, Degraded, as
metav1.Conditions whose `lastTransitionTime` moves only when their status does), writes it through a
`StatusWriter` (written only when it changed), records an Event for each scale, drain, undrain and removal
decision (dry-run Events say what would have been done), and sets the metrics. `report_invalid` and
`report_failure` are the two outcomes that never reach the pipeline (an invalid spec, a failed reconcile).

Everything here is built from the outcome and the policy object as the watch cache holds it (for the
previous status); the writes go through `StatusWriter`, which `controller.kube.reporting.Reporter`
implements, so this module imports no Kubernetes client.

What this module does not do: decide (`controller.decide`), apply (`controller.acting`) or talk to the API
server (`controller.kube.reporting`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from contract import clock as clock_mod
from controller import decide, metrics, pipeline, policy

log = logging.getLogger(__name__)

Obj = dict[str, Any]

ACTION = {"active": "Scale", "dryRun": "DryRun"}
"""The Event `action` of a decision, by whether it was applied."""

SCALE_REASON_ORDER = (
    decide.ReasonCode.SCALE_UP,
    decide.ReasonCode.UNDRAIN,
    decide.ReasonCode.HOLDING_CAPACITY,
    decide.ReasonCode.DRAIN_COMPLETE,
    decide.ReasonCode.DRAIN_TIMEOUT,
    decide.ReasonCode.SCALE_DOWN,
)
"""`lastScaleReason` is the first of these the plan carries: the one that explains the change of replicas."""


class StatusWriter(Protocol):
    """Writes a policy's status subresource and Events (`controller.kube.reporting.Reporter`)."""

    def write_status(self, namespace: str, name: str, status: Obj) -> bool: ...

    def event(
        self, regarding: Obj, *, reason: str, note: str, action: str, warning: bool = False
    ) -> bool: ...


PolicyLookup = Callable[[str, str], Obj | None]
"""(namespace, name) -> the ScalingPolicy object as last watched (its `status` is the previous one)."""


class StatusReporter:
    """Reports each outcome as status, Events and metrics (the Kubernetes loop's `pipeline.Reporter`)."""

    def __init__(
        self, writer: StatusWriter, *, objects: PolicyLookup, controller_metrics: metrics.ControllerMetrics
    ) -> None:
        self.writer = writer
        self.objects = objects
        self.metrics = controller_metrics

    def report(self, outcome: pipeline.Outcome) -> None:
        meta = outcome.policy.metadata
        obj = self.objects(meta.namespace, meta.name)
        if obj is None:  # deleted while reconciling: nothing to write to
            return
        self.writer.write_status(meta.namespace, meta.name, build(obj, outcome))
        action = ACTION["dryRun" if outcome.dry_run else "active"]
        for reason, note in decision_events(outcome):
            self.writer.event(obj, reason=reason, note=note, action=action)
        overwrites = outcome.state.deletion_cost_overwrites
        if overwrites:
            pods = ", ".join(f"{p} (now {v or 'unset'})" for p, v in sorted(overwrites.items()))
            self.writer.event(
                obj,
                reason="DeletionCostOverwritten",
                note=f"pod-deletion-cost set by Forestall was overwritten on {pods}: another controller "
                "(Karpenter?) manages it, so the ReplicaSet may remove other pods than the drained ones",
                action="Detect",
                warning=True,
            )
        self.metrics.observe_outcome(outcome)


def build(obj: Obj, outcome: pipeline.Outcome) -> Obj:
    """The status subresource after `outcome`, given the policy object (and its previous status)."""
    plan, state, now = outcome.plan, outcome.state, outcome.now
    prev = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    overwrites = state.deletion_cost_overwrites
    missing = [r for r in plan.reasons if r.code.missing_data]
    fc = plan.forecast
    conditions = [
        ("Ready", True, "Reconciled", summary(plan)),
        (
            "DemandDataAvailable",
            plan.demand_data_available,
            str(missing[0].code) if missing and not plan.demand_data_available else "DemandFresh",
            "; ".join(r.message for r in missing)
            if not plan.demand_data_available
            else "history, forecast and signals are fresh",
        ),
        (
            "Forecasting",
            fc is not None,
            "Forecasting" if fc is not None else "ForecastMissing",
            f"q{fc.quantile:g} peak {fc.value:g} streams over {fc.horizon_s:g} s"
            + (f" ({fc.model})" if fc.model else "")
            if fc is not None
            else "no forecast: capacity follows current demand only",
        ),
        (
            "Degraded",
            bool(overwrites),
            "DeletionCostOverwritten" if overwrites else "AsExpected",
            f"pod-deletion-cost overwritten on {', '.join(sorted(overwrites))}" if overwrites else "",
        ),
    ]
    draining = sorted(
        ({p.name for p in state.pods if p.drain_started_s is not None} | set(plan.drain))
        - set(plan.undrain)
        - set(plan.remove)
    )
    lead = policy.MeasuredLeadTime(
        node_provisioning_s=state.measured_node_provisioning_s,
        pod_start_s=state.measured_pod_start_s,
        model_load_s=state.measured_model_load_s,
        samples=state.lead_time_samples,
    )
    scaled = outcome.scaled
    status = policy.ScalingPolicyStatus(
        observed_generation=generation,
        observed_demand=plan.observed_demand
        if plan.observed_demand is None
        else max(0.0, plan.observed_demand),
        forecast=policy.ForecastStatus(
            value=max(0.0, fc.value),
            quantile=fc.quantile,
            horizon_s=fc.horizon_s if fc.horizon_s > 0 else outcome.horizon_s,
            model=fc.model,
        )
        if fc is not None
        else None,
        desired_replicas=plan.desired_replicas,
        current_replicas=plan.desired_replicas if scaled else state.spec_replicas,
        ready_replicas=state.ready_replicas,
        provisioned_gpus=state.provisioned_gpus,
        pending_gpus=state.pending_gpus,
        draining_pods=draining,
        last_scale_time=clock_mod.utc_iso(now) if scaled else prev.get("lastScaleTime"),
        last_scale_reason=scale_reason(plan) if scaled else prev.get("lastScaleReason"),
        measured_lead_time=lead,
        conditions=conditions_for(prev, conditions, now=now, generation=generation),
    )
    dumped: Obj = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dumped


def report_invalid(writer: StatusWriter, obj: Obj, message: str, *, now: float) -> None:
    """`Ready=False`, reason `InvalidSpec` with the validation message, and a Warning Event."""
    prev = dict(obj.get("status") or {})
    generation = obj["metadata"].get("generation")
    prev["conditions"] = conditions_for(
        prev, [("Ready", False, "InvalidSpec", message)], now=now, generation=generation, keep_others=True
    )
    if generation is not None:
        prev["observedGeneration"] = generation
    meta = obj["metadata"]
    log.warning("%s/%s: invalid spec: %s", meta.get("namespace"), meta["name"], message)
    writer.write_status(meta.get("namespace", "default"), meta["name"], prev)
    writer.event(obj, reason="InvalidSpec", note=message, action="Validate", warning=True)


def report_failure(writer: StatusWriter, obj: Obj, reason: str, message: str, *, now: float) -> None:
    """`Ready=False` with `reason` (TargetNotFound, ClusterError), the other conditions kept, and an Event."""
    prev = dict(obj.get("status") or {})
    generation = obj["metadata"].get("generation")
    prev["conditions"] = conditions_for(
        prev, [("Ready", False, reason, message)], now=now, generation=generation, keep_others=True
    )
    meta = obj["metadata"]
    writer.write_status(meta.get("namespace", "default"), meta["name"], prev)
    writer.event(obj, reason=reason, note=message, action="Reconcile", warning=True)


def conditions_for(
    prev: Obj,
    wanted: Sequence[tuple[str, bool, str, str]],
    *,
    now: float,
    generation: int | None,
    keep_others: bool = False,
) -> list[Obj]:
    """metav1.Conditions; lastTransitionTime moves only when the status (True/False) changes."""
    before = {c.get("type"): c for c in prev.get("conditions") or []}
    out: dict[str, Obj] = {t: dict(c) for t, c in before.items() if keep_others and t is not None}
    for kind, ok, reason, message in wanted:
        status = "True" if ok else "False"
        old = before.get(kind)
        since = (
            old["lastTransitionTime"]
            if old is not None and old.get("status") == status
            else clock_mod.utc_iso(now)
        )
        cond: Obj = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message[:32768],
            "lastTransitionTime": since,
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        out[kind] = cond
    order = {t: i for i, t in enumerate(policy.CONDITION_TYPES)}
    return sorted(out.values(), key=lambda c: order.get(c["type"], len(order)))


def summary(plan: decide.Plan) -> str:
    """Every reason of a plan, `Code: message; ...`, cut to 1 kB (the Ready condition, Events)."""
    return "; ".join(f"{r.code}: {r.message}" for r in plan.reasons)[:1024]


def scale_reason(plan: decide.Plan) -> str:
    """The code that explains a change of replicas (`lastScaleReason`)."""
    codes = {r.code for r in plan.reasons}
    for code in SCALE_REASON_ORDER:
        if code in codes:
            return str(code)
    return str(plan.reasons[0].code) if plan.reasons else "Scale"


def decision_events(outcome: pipeline.Outcome) -> list[tuple[str, str]]:
    """(reason, note) of the Events a plan deserves: one per scale, drain, undrain and removal decision."""
    parsed, plan, state = outcome.policy, outcome.plan, outcome.state
    ref = parsed.spec.scale_target_ref
    target = f"{ref.kind} {parsed.metadata.namespace}/{ref.name}"
    prefix = "dry run, would have " if outcome.dry_run else ""
    why = summary(plan)
    events = []
    if plan.drain:
        events.append(("Drain", f"{prefix}marked {', '.join(plan.drain)} for draining: {why}"))
    if plan.undrain:
        events.append(("Undrain", f"{prefix}returned {', '.join(plan.undrain)} to service: {why}"))
    if plan.remove:
        events.append(
            ("RemovePods", f"{prefix}removed drained {', '.join(plan.remove)} (lowest deletion cost): {why}")
        )
    if plan.desired_replicas != state.spec_replicas:
        reason = "ScaleUp" if plan.desired_replicas > state.spec_replicas else "ScaleDown"
        events.append(
            (
                reason,
                f"{prefix}scaled {target} from {state.spec_replicas} to {plan.desired_replicas} replicas: {why}",
            )
        )
    return events
