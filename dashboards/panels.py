"""Forestall's three dashboards: which panels, which PromQL, over which metrics.

- *Forecast vs demand* (`forestall-forecast.json`): observed demand, the forecast peak per quantile,
  desired / current / ready replicas, GPUs pending / provisioned / in use, the measured lead time per
  stage against the forecast horizon, and whether demand data is available; per policy through the
  `namespace` and `policy` template variables.
- *Balancer* (`forestall-balancer.json`): streams, queued streams and sessions per backend, stream
  starts and failures, hotspot scores, time to first byte, backends per state and what is left on
  draining ones, the admission queue, rejections and relayed bytes.
- *Decisions* (`forestall-decisions.json`): scale and drain decisions by reason over time and over the
  range, replicas desired vs ready, GPU-hours provisioned / in use / idle, and the controller's own
  reconcile time and errors.

Every query uses the metric names fixed in the project contracts (`forestall_balancer_*` from
`balancer/metrics.py`, `forestall_controller_*` from `controller/metrics.py`); `METRICS` lists them and the
tests check that the dashboards use nothing else.

Rules every query keeps, because a panel that shows a wrong number is worse than an empty one (the demo
once showed -0.283 GPU-hours and a NaN reconcile time):
- counters go through `rate()`/`increase()`, which survive a process restart's counter reset;
- a difference of gauges that cannot be negative in meaning (idle GPUs) is clamped at 0 before it is
  integrated: `in use` above `provisioned` means pods on capacity the provisioner does not hold, not
  negative idleness;
- a histogram quantile is kept only where the histogram had observations in the window (`and on (...)
  (rate(..._count) > 0)`): with none, `histogram_quantile` answers NaN (0/0) and the panel would show
  NaN; this way it shows no data.

`tests/integration/test_dashboard_values.py` backfills a real Prometheus with known series (counter
resets, zero rates, in-use above provisioned included) and checks every panel's value.

What this module does not do: render (`dashboards.engine`) or write files (`dashboards.generate`).
"""

from __future__ import annotations

from dashboards.engine import Dashboard, Panel, Target, Variable

BALANCER_METRICS = (
    "forestall_balancer_active_streams",
    "forestall_balancer_queued_streams",
    "forestall_balancer_open_sessions",
    "forestall_balancer_streams_started_total",
    "forestall_balancer_streams_completed_total",
    "forestall_balancer_streams_failed_total",
    "forestall_balancer_ttfb_seconds",
    "forestall_balancer_backend_state",
    "forestall_balancer_hotspot_score",
    "forestall_balancer_admission_queue_length",
    "forestall_balancer_rejected_streams_total",
    "forestall_balancer_relayed_bytes_total",
)
CONTROLLER_METRICS = (
    "forestall_controller_observed_demand_streams",
    "forestall_controller_forecast_streams",
    "forestall_controller_horizon_seconds",
    "forestall_controller_desired_replicas",
    "forestall_controller_current_replicas",
    "forestall_controller_ready_replicas",
    "forestall_controller_pending_gpus",
    "forestall_controller_provisioned_gpus",
    "forestall_controller_gpus_in_use",
    "forestall_controller_lead_time_seconds",
    "forestall_controller_decisions_total",
    "forestall_controller_drains_total",
    "forestall_controller_demand_data_available",
    "forestall_controller_reconcile_duration_seconds",
    "forestall_controller_reconcile_errors_total",
)
METRICS = BALANCER_METRICS + CONTROLLER_METRICS
"""The metric names of the project contract (histograms by base name: `_bucket`/`_sum`/`_count` follow)."""

POLICY = 'namespace=~"$namespace", policy=~"$policy"'
BACKEND = 'backend=~"$backend"'

TTFB_RATE = f"rate(forestall_balancer_ttfb_seconds_count{{{BACKEND}}}[$__rate_interval])"
RECONCILED = "(sum(rate(forestall_controller_reconcile_duration_seconds_count[$__rate_interval])) > 0)"
"""Guards for `histogram_quantile`: observations in the window, else no value instead of NaN (0/0)."""

DATASOURCE_VARIABLE = Variable("datasource")
NAMESPACE = Variable("namespace", "label_values(forestall_controller_observed_demand_streams, namespace)")
POLICY_VARIABLE = Variable(
    "policy", 'label_values(forestall_controller_observed_demand_streams{namespace=~"$namespace"}, policy)'
)
BACKEND_VARIABLE = Variable("backend", "label_values(forestall_balancer_active_streams, backend)")

FORECAST = Dashboard(
    uid="forestall-forecast",
    title="Forestall / Forecast vs demand",
    description="Observed stream demand against the forecast peak, capacity and the measured lead time, per policy.",
    variables=(DATASOURCE_VARIABLE, NAMESPACE, POLICY_VARIABLE),
    panels=(
        Panel(
            title="Demand and forecast peak",
            description="Concurrent streams now, and the forecast peak over the horizon per quantile: "
            "demand should stay under the upper quantile, which is what capacity is provisioned for.",
            targets=(
                Target(
                    f"sum by (namespace, policy) (forestall_controller_observed_demand_streams{{{POLICY}}})",
                    "{{namespace}}/{{policy}} observed",
                ),
                Target(
                    f"max by (namespace, policy, quantile) (forestall_controller_forecast_streams{{{POLICY}}})",
                    "{{namespace}}/{{policy}} forecast q{{quantile}}",
                ),
            ),
            dashed="/forecast/",
            fill_opacity=0,
            width=24,
            height=10,
        ),
        Panel(
            title="Replicas: desired, current, ready",
            description="Desired is the plan; current is what the target has; ready is what serves. "
            "Desired rising before demand does is the point.",
            targets=(
                Target(
                    f"sum by (namespace, policy) (forestall_controller_desired_replicas{{{POLICY}}})",
                    "{{policy}} desired",
                ),
                Target(
                    f"sum by (namespace, policy) (forestall_controller_current_replicas{{{POLICY}}})",
                    "{{policy}} current",
                ),
                Target(
                    f"sum by (namespace, policy) (forestall_controller_ready_replicas{{{POLICY}}})",
                    "{{policy}} ready",
                ),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="GPUs: pending, provisioned, in use",
            description="GPUs requested but not yet on a Ready node (pending), on Ready nodes for this "
            "policy (provisioned) and held by worker pods (in use).",
            targets=(
                Target(
                    f"sum by (policy) (forestall_controller_pending_gpus{{{POLICY}}})", "{{policy}} pending"
                ),
                Target(
                    f"sum by (policy) (forestall_controller_provisioned_gpus{{{POLICY}}})",
                    "{{policy}} provisioned",
                ),
                Target(
                    f"sum by (policy) (forestall_controller_gpus_in_use{{{POLICY}}})", "{{policy}} in use"
                ),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="Measured lead time by stage vs horizon",
            description="Node provisioning, pod start and model load as measured (stacked), against the "
            "horizon the forecast covers: the stack should stay under the horizon line.",
            targets=(
                Target(
                    f"max by (policy, stage) (forestall_controller_lead_time_seconds{{{POLICY}}})",
                    "{{policy}} {{stage}}",
                ),
                Target(
                    f"max by (policy) (forestall_controller_horizon_seconds{{{POLICY}}})",
                    "{{policy}} horizon",
                ),
            ),
            unit="s",
            dashed="/horizon/",
        ),
        Panel(
            title="Demand data available",
            description="1 when Prometheus and the balancer signals are fresh; 0 means capacity is held "
            "(never lowered) and the policy's DemandDataAvailable condition is False.",
            targets=(
                Target(
                    f"min by (namespace, policy) (forestall_controller_demand_data_available{{{POLICY}}})",
                    "{{namespace}}/{{policy}}",
                ),
            ),
            kind="stat",
            width=12,
            height=6,
        ),
    ),
)

BALANCER = Dashboard(
    uid="forestall-balancer",
    title="Forestall / Balancer",
    description="Streams per backend, hotspots, time to first byte, drains and admission, summed over balancer replicas.",
    variables=(DATASOURCE_VARIABLE, BACKEND_VARIABLE),
    panels=(
        Panel(
            title="Active streams per backend",
            description="Streams counted from pick to last byte: the load the balancer levels.",
            targets=(
                Target(f"sum by (backend) (forestall_balancer_active_streams{{{BACKEND}}})", "{{backend}}"),
            ),
            stack=True,
        ),
        Panel(
            title="Queued streams and sessions per backend",
            description="Streams the backend reports waiting (vLLM num_requests_waiting) and MCP sessions pinned to it.",
            targets=(
                Target(
                    f"sum by (backend) (forestall_balancer_queued_streams{{{BACKEND}}})", "{{backend}} queued"
                ),
                Target(
                    f"sum by (backend) (forestall_balancer_open_sessions{{{BACKEND}}})",
                    "{{backend}} sessions",
                ),
            ),
        ),
        Panel(
            title="Stream starts and completions per second",
            description="Placement rate per backend, and completions: a gap that grows means streams pile up.",
            targets=(
                Target(
                    f"sum by (backend) (rate(forestall_balancer_streams_started_total{{{BACKEND}}}[$__rate_interval]))",
                    "{{backend}} started",
                ),
                Target(
                    f"sum(rate(forestall_balancer_streams_completed_total{{{BACKEND}}}[$__rate_interval]))",
                    "all completed",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            title="Failed streams per second by reason",
            description="Connect errors, resets, timeouts, JSON-RPC errors in 200s, backend gone mid-stream.",
            targets=(
                Target(
                    f"sum by (backend, reason) (rate(forestall_balancer_streams_failed_total{{{BACKEND}}}[$__rate_interval]))",
                    "{{backend}} {{reason}}",
                ),
            ),
            unit="reqps",
            kind="bars",
        ),
        Panel(
            title="Hotspot score per backend",
            description="Load over the weighted mean load; above the configured factor for long enough is a hotspot.",
            targets=(
                Target(f"max by (backend) (forestall_balancer_hotspot_score{{{BACKEND}}})", "{{backend}}"),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="Time to first byte",
            description="p50 and p99 over all backends, and p99 per backend, from the balancer's histogram; "
            "no data where no stream started in the interval.",
            targets=(
                Target(
                    f"histogram_quantile(0.5, sum by (le) (rate(forestall_balancer_ttfb_seconds_bucket{{{BACKEND}}}[$__rate_interval])))"
                    f" and on () (sum({TTFB_RATE}) > 0)",
                    "p50",
                ),
                Target(
                    f"histogram_quantile(0.99, sum by (le) (rate(forestall_balancer_ttfb_seconds_bucket{{{BACKEND}}}[$__rate_interval])))"
                    f" and on () (sum({TTFB_RATE}) > 0)",
                    "p99",
                ),
                Target(
                    f"histogram_quantile(0.99, sum by (backend, le) (rate(forestall_balancer_ttfb_seconds_bucket{{{BACKEND}}}[$__rate_interval])))"
                    f" and on (backend) (sum by (backend) ({TTFB_RATE}) > 0)",
                    "{{backend}} p99",
                ),
            ),
            unit="s",
            fill_opacity=0,
        ),
        Panel(
            title="Backends by state",
            description="How many backends are warming, ready, draining or ejected (max over balancer replicas).",
            targets=(
                Target(
                    f"sum by (state) (max by (backend, state) (forestall_balancer_backend_state{{{BACKEND}}}))",
                    "{{state}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            title="Streams left on draining backends",
            description="What a drain waits for: the controller removes a draining pod when this reaches 0 "
            "or at the drain timeout.",
            targets=(
                Target(
                    f"sum by (backend) (forestall_balancer_active_streams{{{BACKEND}}} "
                    f'and on (backend) (forestall_balancer_backend_state{{{BACKEND}, state="draining"}} == 1))',
                    "{{backend}}",
                ),
            ),
        ),
        Panel(
            title="Admission queue",
            description="Streams waiting because every backend is at capacity (capacity on its way).",
            targets=(Target("sum(forestall_balancer_admission_queue_length)", "queued"),),
        ),
        Panel(
            title="Rejected streams per second",
            description="Streams answered 503 with Retry-After: queue full or waited too long. Should be 0.",
            targets=(
                Target("sum(rate(forestall_balancer_rejected_streams_total[$__rate_interval]))", "rejected"),
            ),
            unit="reqps",
            kind="bars",
        ),
        Panel(
            title="Relayed bytes per second",
            description="Response body bytes relayed, per backend.",
            targets=(
                Target(
                    f"sum by (backend) (rate(forestall_balancer_relayed_bytes_total{{{BACKEND}}}[$__rate_interval]))",
                    "{{backend}}",
                ),
            ),
            unit="Bps",
            width=24,
        ),
    ),
)

DECISIONS = Dashboard(
    uid="forestall-decisions",
    title="Forestall / Decisions",
    description="Scale and drain decisions with their reasons, GPU-hours, and the controller's own health.",
    variables=(DATASOURCE_VARIABLE, NAMESPACE, POLICY_VARIABLE),
    panels=(
        Panel(
            title="Decisions by reason",
            description="Each reconcile's plan reason (forecast scale-up, reactive floor, hotspot, "
            "scale-down, hold on missing data, ...), counted per interval.",
            targets=(
                Target(
                    f"sum by (reason) (increase(forestall_controller_decisions_total{{{POLICY}}}[$__rate_interval]))",
                    "{{reason}}",
                ),
            ),
            kind="bars",
            stack=True,
            width=24,
        ),
        Panel(
            title="Drains started",
            description="Pods marked for removal (drained first, removed when empty or at the timeout).",
            targets=(
                Target(
                    f"sum by (namespace, policy) (increase(forestall_controller_drains_total{{{POLICY}}}[$__rate_interval]))",
                    "{{namespace}}/{{policy}}",
                ),
            ),
            kind="bars",
        ),
        Panel(
            title="Replicas desired vs ready",
            description="The decisions' effect: steps in desired, and ready following a lead time later.",
            targets=(
                Target(
                    f"sum by (policy) (forestall_controller_desired_replicas{{{POLICY}}})",
                    "{{policy}} desired",
                ),
                Target(
                    f"sum by (policy) (forestall_controller_ready_replicas{{{POLICY}}})", "{{policy}} ready"
                ),
            ),
            fill_opacity=0,
        ),
        Panel(
            title="Decisions over the range",
            description="How often each reason decided, per policy, over the dashboard's time range.",
            targets=(
                Target(
                    f"sum by (namespace, policy, reason) (increase(forestall_controller_decisions_total{{{POLICY}}}[$__range]))",
                    instant=True,
                ),
            ),
            kind="table",
        ),
        Panel(
            title="GPU-hours over the range",
            description="GPUs provisioned and in use integrated over the range (1-minute samples), and "
            "the idle GPU-hours paid for staying ahead of demand: provisioned minus in use, counted as 0 "
            "in the minutes when pods use more than the provisioner holds (capacity it did not buy).",
            targets=(
                Target(
                    f"sum by (policy) (sum_over_time(forestall_controller_provisioned_gpus{{{POLICY}}}[$__range:1m])) / 60",
                    "{{policy}} provisioned",
                    instant=True,
                ),
                Target(
                    f"sum by (policy) (sum_over_time(forestall_controller_gpus_in_use{{{POLICY}}}[$__range:1m])) / 60",
                    "{{policy}} in use",
                    instant=True,
                ),
                Target(
                    f"sum by (policy) (sum_over_time(clamp_min(forestall_controller_provisioned_gpus{{{POLICY}}} "
                    f"- forestall_controller_gpus_in_use{{{POLICY}}}, 0)[$__range:1m])) / 60",
                    "{{policy}} idle",
                    instant=True,
                ),
            ),
            kind="stat",
            unit="h",
        ),
        Panel(
            title="GPUs provisioned (GPU-hours per hour)",
            description="The bill's rate: GPUs on Ready nodes for each policy.",
            targets=(
                Target(
                    f"sum by (policy) (forestall_controller_provisioned_gpus{{{POLICY}}})",
                    "{{policy}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            title="Reconcile duration",
            description="p50 and p99 of one policy's reconcile (read, forecast, decide, act); no data in "
            "intervals without a reconcile.",
            targets=(
                Target(
                    "histogram_quantile(0.5, sum by (le) (rate(forestall_controller_reconcile_duration_seconds_bucket[$__rate_interval])))"
                    f" and on () {RECONCILED}",
                    "p50",
                ),
                Target(
                    "histogram_quantile(0.99, sum by (le) (rate(forestall_controller_reconcile_duration_seconds_bucket[$__rate_interval])))"
                    f" and on () {RECONCILED}",
                    "p99",
                ),
            ),
            unit="s",
            fill_opacity=0,
        ),
        Panel(
            title="Reconcile errors per second",
            description="Failed reconciles (API errors, conflicts retried later). The others carry on.",
            targets=(
                Target(
                    f"sum by (namespace, policy) (rate(forestall_controller_reconcile_errors_total{{{POLICY}}}[$__rate_interval]))",
                    "{{namespace}}/{{policy}}",
                ),
            ),
            unit="reqps",
            kind="bars",
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (FORECAST, BALANCER, DECISIONS)
