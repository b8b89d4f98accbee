"""The controller's Prometheus metrics, exactly as named in the contracts (dashboards depend on the names).

Labels are `namespace` and `policy` only, plus the small fixed label some metrics carry (`quantile`, `stage`,
`reason`, whose values come from fixed sets: the policy's forecast quantile, the three lead-time stages and
`controller.decide.REASON_CODES`), so cardinality grows with the number of policies and nothing else.
`reconcile_duration_seconds` has no labels at all: it is the cost of one policy's reconcile.

Each `ControllerMetrics` registers on its own `CollectorRegistry` (tests get a fresh one each); `forget()`
drops a deleted policy's series so they do not linger at their last value.

What this module does not do: serve the metrics (the CLI starts prometheus_client's HTTP server).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller import acting, cluster, decide, pipeline, policy

POLICY_LABELS = ("namespace", "policy")

RECONCILE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""One policy's reconcile is a few milliseconds when healthy; the top buckets catch API server trouble."""


class ControllerMetrics:
    """All controller metrics on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.observed_demand = Gauge(
            "forestall_controller_observed_demand_streams",
            "Concurrent streams now.",
            POLICY_LABELS,
            registry=r,
        )
        self.forecast = Gauge(
            "forestall_controller_forecast_streams",
            "Forecast quantile of the peak of concurrent streams over the horizon.",
            (*POLICY_LABELS, "quantile"),
            registry=r,
        )
        self.horizon = Gauge(
            "forestall_controller_horizon_seconds",
            "Forecast horizon (lead time) used.",
            POLICY_LABELS,
            registry=r,
        )
        self.desired_replicas = Gauge(
            "forestall_controller_desired_replicas",
            "Replicas the last plan wants.",
            POLICY_LABELS,
            registry=r,
        )
        self.current_replicas = Gauge(
            "forestall_controller_current_replicas", "The target's spec.replicas.", POLICY_LABELS, registry=r
        )
        self.ready_replicas = Gauge(
            "forestall_controller_ready_replicas", "The target's Ready pods.", POLICY_LABELS, registry=r
        )
        self.pending_gpus = Gauge(
            "forestall_controller_pending_gpus",
            "GPUs requested, not yet on Ready nodes.",
            POLICY_LABELS,
            registry=r,
        )
        self.provisioned_gpus = Gauge(
            "forestall_controller_provisioned_gpus",
            "GPUs held ahead of demand by the provisioner.",
            POLICY_LABELS,
            registry=r,
        )
        self.gpus_in_use = Gauge(
            "forestall_controller_gpus_in_use",
            "GPUs of the target's scheduled pods.",
            POLICY_LABELS,
            registry=r,
        )
        self.lead_time = Gauge(
            "forestall_controller_lead_time_seconds",
            "Measured lead time per stage (node_provisioning, pod_start, model_load).",
            (*POLICY_LABELS, "stage"),
            registry=r,
        )
        self.decisions = Counter(
            "forestall_controller_decisions",
            "Reconciles whose plan carried each reason code.",
            (*POLICY_LABELS, "reason"),
            registry=r,
        )
        self.drains = Counter(
            "forestall_controller_drains", "Pods marked for draining.", POLICY_LABELS, registry=r
        )
        self.demand_data_available = Gauge(
            "forestall_controller_demand_data_available",
            "1 when history, forecast and signals were fresh at the last reconcile.",
            POLICY_LABELS,
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "forestall_controller_reconcile_duration_seconds",
            "Time to reconcile one policy.",
            buckets=RECONCILE_BUCKETS_S,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "forestall_controller_reconcile_errors", "Reconciles that failed.", POLICY_LABELS, registry=r
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        """Labelled children by (metric, labels): `labels()` costs more than the update itself, and
        `observe_plan` runs a dozen of them per policy per cycle."""

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_plan(
        self,
        namespace: str,
        name: str,
        *,
        spec: policy.ScalingPolicySpec,
        plan: decide.Plan,
        state: cluster.ClusterState,
        horizon_s: float,
    ) -> None:
        """Set every per-policy gauge from one reconcile's plan and the state it was made on."""
        labels = (namespace, name)
        c = self.child
        if plan.observed_demand is not None:
            c(self.observed_demand, *labels).set(plan.observed_demand)
        if plan.forecast is not None:
            c(self.forecast, *labels, f"{plan.forecast.quantile:g}").set(plan.forecast.value)
        c(self.horizon, *labels).set(horizon_s)
        c(self.desired_replicas, *labels).set(plan.desired_replicas)
        c(self.current_replicas, *labels).set(state.spec_replicas)
        c(self.ready_replicas, *labels).set(state.ready_replicas)
        c(self.pending_gpus, *labels).set(state.pending_gpus)
        c(self.provisioned_gpus, *labels).set(state.provisioned_gpus)
        scheduled = sum(1 for p in state.pods if p.phase in ("starting", "ready"))
        c(self.gpus_in_use, *labels).set(scheduled * spec.capacity.gpus_per_replica)
        for stage, value in (
            ("node_provisioning", state.measured_node_provisioning_s),
            ("pod_start", state.measured_pod_start_s),
            ("model_load", state.measured_model_load_s),
        ):
            if value is not None:
                c(self.lead_time, *labels, stage).set(value)
        for code in sorted({reason.code for reason in plan.reasons}):
            c(self.decisions, *labels, code).inc()
        c(self.demand_data_available, *labels).set(1 if plan.demand_data_available else 0)

    def observe_outcome(self, outcome: pipeline.Outcome) -> None:
        """Everything one reconcile tells the metrics: the plan's gauges and the drains it applied."""
        meta = outcome.policy.metadata
        self.observe_plan(
            meta.namespace,
            meta.name,
            spec=outcome.policy.spec,
            plan=outcome.plan,
            state=outcome.state,
            horizon_s=outcome.horizon_s,
        )
        drained = sum(1 for a in outcome.actions if isinstance(a, acting.Drain))
        if drained:
            self.child(self.drains, meta.namespace, meta.name).inc(drained)

    def forget(self, namespace: str, name: str) -> None:
        """Remove every series of a deleted policy."""
        for metric in (
            self.observed_demand,
            self.forecast,
            self.horizon,
            self.desired_replicas,
            self.current_replicas,
            self.ready_replicas,
            self.pending_gpus,
            self.provisioned_gpus,
            self.gpus_in_use,
            self.lead_time,
            self.decisions,
            self.drains,
            self.demand_data_available,
            self.reconcile_errors,
        ):
            for sample_labels in list(metric._metrics):  # prometheus_client keeps label tuples here
                if sample_labels[:2] == (namespace, name):
                    metric.remove(*sample_labels)
        self._children = {k: v for k, v in self._children.items() if k[1][:2] != (namespace, name)}
