"""The ScalingPolicy API (`forestall.dev/v1alpha1`): one pydantic model tree, the single source of truth.

The CRD's OpenAPI v3 schema under `manifests/crd/` is generated from these models (`controller.crd`), the
CLI's `forestall validate`, the simulator and the live controller all parse policies through them, and there
is no second parser.

Validation lives in two places that must agree:

- bounds, enums and defaults are field constraints, which the generator turns into schema keywords;
- cross-field rules are written once as CEL (`x-kubernetes-validations`, evaluated by the API server) in each
  model's `CEL_RULES`, and once as Python in the same model's `_check` validator. A test evaluates both on
  the same cases (`tests/unit/test_policy.py`, with the CEL evaluator of `tests/fakes/crd_schema.py`).

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python, with units in the
Python names (`node_provisioning_s`, wire `nodeProvisioningSeconds`).

What this module does not do: talk to Kubernetes, or decide anything. It only says what a valid policy is.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controller import errors

GROUP = "forestall.dev"
VERSION = "v1alpha1"
API_VERSION: Final[Literal["forestall.dev/v1alpha1"]] = "forestall.dev/v1alpha1"
KIND: Final[Literal["ScalingPolicy"]] = "ScalingPolicy"
PLURAL = "scalingpolicies"
SINGULAR = "scalingpolicy"
SHORT_NAMES = ("sp",)

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource name NVIDIA's device plugin advertises; AMD uses `amd.com/gpu`."""

ConditionType = Literal["Ready", "DemandDataAvailable", "Forecasting", "Degraded"]
CONDITION_TYPES: tuple[ConditionType, ...] = ("Ready", "DemandDataAvailable", "Forecasting", "Degraded")

Rule = tuple[str, str]
"""A CEL rule and the message the API server returns when it is false.

Every list and string a rule touches must be bounded (maxItems, maxLength or an enum): the API server
estimates each rule's cost from those bounds at CRD creation and refuses a CRD over budget, costing an
unbounded list at about 90,000 items and an unbounded string at about 3 MiB. `tests/unit/test_crd_cost.py`
walks the generated schema and fails on an unbounded one."""

LABEL_VALUE_MAX = 63
"""Longest Kubernetes label value; GPU product names are node label values."""

GPU_TYPES_MAX = 16
"""Most GPU types one policy lists: more kinds of GPU than any real node pool mixes, and a bound the API
server's CEL cost estimate needs."""


class _Model(BaseModel):
    """Base of every spec model: frozen, unknown fields rejected, camelCase on the wire."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        use_attribute_docstrings=True,
        alias_generator=lambda name: _camel(name),
    )

    CEL_RULES: ClassVar[tuple[Rule, ...]] = ()
    """Cross-field rules for the CRD schema; `_check` enforces the same in Python."""


def _camel(name: str) -> str:
    """`node_provisioning_s` -> `nodeProvisioningSeconds`: the wire name of a Python field."""
    if name.endswith("_s"):
        name = name[:-2] + "_seconds"
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class ScaleTargetRef(_Model):
    """The workload of GPU workers that the policy scales, through its scale subresource."""

    api_version: str = Field("apps/v1", min_length=1)
    """API version of the target; `apps/v1` for Deployments and StatefulSets."""

    kind: Literal["Deployment", "StatefulSet"]
    """Kind of the target. Both serve the scale subresource and honour pod-deletion-cost (Deployment)."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the target in the policy's namespace."""


class PrometheusDemand(_Model):
    """Demand history from Prometheus: a PromQL expression for concurrent streams."""

    url: str = Field("http://prometheus-operated.monitoring.svc:9090", min_length=1)
    """Base URL of the Prometheus HTTP API. The default is the Prometheus Operator's governing Service."""

    query: str = Field(min_length=1)
    """PromQL returning one series: concurrent streams of this workload, e.g.
    `sum(forestall_balancer_active_streams{namespace="llm"})`."""


class BalancerDemand(_Model):
    """Live per-pod figures from every replica of a Forestall balancer, found through its Service."""

    service: str = Field(min_length=1)
    """Name of the balancer Service; its EndpointSlices list the replicas to ask."""

    namespace: str | None = None
    """Namespace of the Service; the policy's own when unset."""

    port: int = Field(8081, ge=1, le=65535)
    """Port serving `/signals` (the balancer's admin/signals listener)."""


class Demand(_Model):
    """Where demand comes from: Prometheus for history, the balancer for what is happening now."""

    CEL_RULES: ClassVar[tuple[Rule, ...]] = (
        (
            "has(self.prometheus) || has(self.balancer)",
            "demand needs prometheus or balancer (or both): set demand.prometheus.query or demand.balancer.service",
        ),
    )

    prometheus: PrometheusDemand | None = None
    """History and current demand from a PromQL query."""

    balancer: BalancerDemand | None = None
    """Live demand and hotspots from the balancer's `/signals`."""

    stale_after_s: float = Field(60.0, gt=0)
    """Demand older than this counts as missing: capacity is held, never lowered, until fresh data arrives."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.prometheus is None and self.balancer is None:
            raise ValueError(
                "demand needs prometheus or balancer (or both), got neither: "
                "set demand.prometheus.query or demand.balancer.service"
            )
        return self


class GpuType(_Model):
    """Capacity of one replica on one kind of GPU (heterogeneous node pools)."""

    name: str = Field(min_length=1, max_length=LABEL_VALUE_MAX)
    """GPU product as nodes label it (`nvidia.com/gpu.product`), e.g. `NVIDIA-H100-80GB-HBM3`."""

    streams_per_replica: int = Field(gt=0)
    """Concurrent streams one replica on this GPU serves within the time-to-first-token target."""


class Capacity(_Model):
    """What one replica of the target can carry and what it costs in GPUs."""

    streams_per_replica: int = Field(gt=0)
    """Concurrent streams one replica serves within the time-to-first-token target (e.g. vLLM's max-num-seqs
    at which TTFT still meets the SLO). Required: it converts demand into replicas."""

    gpus_per_replica: int = Field(1, ge=1)
    """GPUs each replica requests; a tensor-parallel model of degree 4 needs 4."""

    gpus_per_node: int = Field(8, ge=1)
    """GPUs on one node of the pool the replicas land on; 8 is the common HGX/DGX layout."""

    gpu_resource_name: str = Field(DEFAULT_GPU_RESOURCE, min_length=1)
    """Extended resource the replicas request, for placeholder and buffer pods."""

    seconds_per_token: float = Field(0.03, gt=0)
    """Mean seconds per generated token of one stream; turns token counts into stream durations in
    `forestall simulate`. 30 ms is typical decode speed for a 7-13B model under load."""

    gpu_types: list[GpuType] = Field(
        default_factory=list,
        max_length=GPU_TYPES_MAX,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Per-GPU-type capacity, overriding streamsPerReplica on nodes labelled (nvidia.com/gpu.product) with a
    listed name; pods elsewhere or not yet placed count at streamsPerReplica, so set that to the smallest
    type's. The balancers weigh each pod by its type's streams (forestall.dev/capacity-weight). A map list
    keyed by name: the API server itself refuses a duplicate name, at no CEL cost."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [gpu.name for gpu in self.gpu_types]
        if len(set(names)) != len(names):
            raise ValueError(f"capacity.gpuTypes names must be unique, got {names}: remove the duplicate")
        return self


class Replicas(_Model):
    """Bounds on the target's replicas, whatever the forecast says."""

    CEL_RULES: ClassVar[tuple[Rule, ...]] = (
        ("self.min <= self.max", "replicas.min must be <= replicas.max: lower min or raise max"),
    )

    min: int = Field(1, ge=0)
    """Fewest replicas; 0 allows scale to zero (the first stream then waits a full lead time)."""

    max: int = Field(ge=1)
    """Most replicas: the spending cap. Required, because an unbounded GPU bill is never a safe default."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min > self.max:
            raise ValueError(
                f"replicas.min must be <= replicas.max, got min={self.min} max={self.max}: "
                "lower min or raise max"
            )
        return self


class Forecast(_Model):
    """How the peak of concurrent streams over the horizon is forecast."""

    quantile: float = Field(0.95, gt=0.5, lt=1.0)
    """Quantile of the peak that scale-up provisions for. Above the median, since under-provisioning a stream
    costs more than an idle GPU-minute; below 1, since the maximum of a forecast is unbounded."""

    history_s: float = Field(7 * 86400.0, gt=0)
    """How much demand history the forecast reads: a week sees both daily and weekly cycles."""

    step_s: float = Field(60.0, gt=0)
    """Resolution of the demand history; one minute resolves ramps without a huge range query."""

    model: Literal["auto", "seasonalNaive", "recentMax", "seasonalProfile", "gbm"] = "auto"
    """Forecast model; `auto` picks by rolling-origin backtest on the series' own recent history."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.step_s > self.history_s:
            raise ValueError(
                f"forecast.stepSeconds must be <= forecast.historySeconds, got step={self.step_s} "
                f"history={self.history_s}: lower the step or read more history"
            )
        return self

    CEL_RULES: ClassVar[tuple[Rule, ...]] = (
        (
            "self.stepSeconds <= self.historySeconds",
            "forecast.stepSeconds must be <= forecast.historySeconds: lower the step or read more history",
        ),
    )


class LeadTime(_Model):
    """How long new capacity takes to serve: priors until the controller has measured the real values."""

    node_provisioning_s: float = Field(300.0, gt=0)
    """Seconds from requesting a GPU node to it being Ready. Five minutes is typical for cloud GPU nodes."""

    pod_start_s: float = Field(60.0, gt=0)
    """Seconds from a pod being scheduled to its container running (image pull on a warm node)."""

    model_load_s: float = Field(120.0, gt=0)
    """Seconds from the container running to the model being loaded and the pod Ready."""

    horizon_s: float | None = Field(None, gt=0)
    """Forecast horizon; the sum of the three lead times when unset."""

    @property
    def total_s(self) -> float:
        """The horizon the forecast must cover."""
        if self.horizon_s is not None:
            return self.horizon_s
        return self.node_provisioning_s + self.pod_start_s + self.model_load_s


class ScaleDown(_Model):
    """How capacity leaves: slowly, and never with streams on it."""

    CEL_RULES: ClassVar[tuple[Rule, ...]] = (
        (
            "self.drainTimeoutSeconds <= self.stabilizationWindowSeconds",
            "scaleDown.drainTimeoutSeconds must be <= scaleDown.stabilizationWindowSeconds: "
            "shorten the drain timeout or lengthen the window",
        ),
    )

    stabilization_window_s: float = Field(600.0, ge=0)
    """Demand must stay low this long before any pod is removed. Longer than HPA's 300 s default because a GPU
    pod removed too early costs a full lead time to get back."""

    max_pods_per_minute: int = Field(1, ge=1)
    """Most pods marked for removal per minute, so a forecast error cannot empty the pool at once."""

    drain_timeout_s: float = Field(300.0, gt=0)
    """After this, a draining pod is removed even with streams left (they are cut and counted). At most the
    stabilization window: the demand that justified the removal is stale after that."""

    whole_nodes: bool = True
    """Remove pods only as whole GPU nodes empty (emptiest node first). True suits a pool whose nodes serve
    this model alone: a pod drained from a node that stays saves nothing and costs a lead time to get back.
    Set false when the nodes are shared with other workloads, so surplus pods go one by one (least used
    first) and their GPUs serve the others."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.drain_timeout_s > self.stabilization_window_s:
            raise ValueError(
                "scaleDown.drainTimeoutSeconds must be <= scaleDown.stabilizationWindowSeconds, got "
                f"drainTimeoutSeconds={self.drain_timeout_s:g} stabilizationWindowSeconds="
                f"{self.stabilization_window_s:g}: shorten the drain timeout or lengthen the window"
            )
        return self


class CapacityBufferProvisioner(_Model):
    """Settings for `provisioner.type: capacityBuffer` (autoscaling.x-k8s.io CapacityBuffer)."""

    name: str | None = Field(None, min_length=1)
    """Name of the CapacityBuffer the controller owns; `<policy>-buffer` when unset."""


class PlaceholderProvisioner(_Model):
    """Settings for `provisioner.type: placeholder`: low-priority pods that hold GPUs until evicted."""

    priority_class_name: str = Field("forestall-placeholder", min_length=1, max_length=253)
    """PriorityClass of the placeholder pods: it must have a negative value and `preemptionPolicy: Never`
    (the controller creates `forestall-placeholder` so; a class that could preempt real pods refuses the
    policy). The pods run the controller's pause image, which a policy cannot change."""


class ProvisioningRequestProvisioner(_Model):
    """Settings for `provisioner.type: provisioningRequest` (cluster-autoscaler ProvisioningRequest)."""

    provisioning_class_name: str = Field(
        "best-effort-atomic-scale-up.autoscaling.x-k8s.io",
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
    """How the request is served: `best-effort-atomic-scale-up.autoscaling.x-k8s.io` provisions all nodes or
    none; `check-capacity.autoscaling.x-k8s.io` only checks (never counted as held); provider classes such as
    GKE's `queued-provisioning.gke.io` are passed through as named."""

    booking_s: float = Field(600.0, gt=0)
    """How long capacity stays booked once provisioned; cluster-autoscaler releases it after about 10 min,
    so the controller renews requests whose capacity is still forecast."""


class Provisioner(_Model):
    """How GPU nodes are brought up ahead of the forecast peak."""

    CEL_RULES: ClassVar[tuple[Rule, ...]] = (
        (
            "!has(self.capacityBuffer) || self.type == 'capacityBuffer'",
            "provisioner.capacityBuffer is only valid with provisioner.type capacityBuffer",
        ),
        (
            "!has(self.placeholder) || self.type == 'placeholder'",
            "provisioner.placeholder is only valid with provisioner.type placeholder",
        ),
        (
            "!has(self.provisioningRequest) || self.type == 'provisioningRequest'",
            "provisioner.provisioningRequest is only valid with provisioner.type provisioningRequest",
        ),
    )

    type: Literal["pods", "capacityBuffer", "placeholder", "provisioningRequest"] = "pods"
    """`pods`: scale ahead, pending pods drive Karpenter or cluster-autoscaler. `capacityBuffer`: write a
    CapacityBuffer. `placeholder`: low-priority placeholder pods. `provisioningRequest`: a ProvisioningRequest."""

    capacity_buffer: CapacityBufferProvisioner | None = None
    placeholder: PlaceholderProvisioner | None = None
    provisioning_request: ProvisioningRequestProvisioner | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        for field, wire in (
            ("capacity_buffer", "capacityBuffer"),
            ("placeholder", "placeholder"),
            ("provisioning_request", "provisioningRequest"),
        ):
            if getattr(self, field) is not None and self.type != wire:
                raise ValueError(
                    f"provisioner.{wire} is only valid with provisioner.type {wire}, got type={self.type!r}: "
                    f"set type to {wire!r} or remove provisioner.{wire}"
                )
        return self


class Slo(_Model):
    """The service level the policy provisions for."""

    time_to_first_token_s: float = Field(2.0, gt=0)
    """A stream meets the SLO when its first token leaves within this many seconds of arrival."""


class ScalingPolicySpec(_Model):
    """What to scale, from which demand, within which bounds, and how fast."""

    scale_target_ref: ScaleTargetRef
    demand: Demand
    capacity: Capacity
    replicas: Replicas
    forecast: Forecast = Forecast()
    lead_time: LeadTime = LeadTime()
    scale_down: ScaleDown = ScaleDown()
    provisioner: Provisioner = Provisioner()
    slo: Slo = Slo()
    mode: Literal["active", "dryRun"] = "active"
    """`dryRun` computes and reports everything (status, metrics, events) and changes nothing."""


class Condition(_Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, alias_generator=_camel)

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, ge=0)


class ForecastStatus(_Model):
    """The forecast the last plan used."""

    value: float = Field(ge=0)
    """Forecast quantile of the peak of concurrent streams over the horizon."""

    quantile: float = Field(gt=0, lt=1)
    horizon_s: float = Field(gt=0)
    model: str = ""


class MeasuredLeadTime(_Model):
    """Lead times the controller measured on this cluster (median of recent observations)."""

    node_provisioning_s: float | None = Field(None, ge=0)
    pod_start_s: float | None = Field(None, ge=0)
    model_load_s: float | None = Field(None, ge=0)
    samples: int = Field(0, ge=0)


class ScalingPolicyStatus(_Model):
    """What the controller observed and decided, written through the status subresource."""

    model_config = ConfigDict(frozen=False, extra="forbid", populate_by_name=True, alias_generator=_camel)

    observed_generation: int | None = Field(None, ge=0)
    observed_demand: float | None = Field(None, ge=0)
    """Concurrent streams now, from the balancer or Prometheus."""

    forecast: ForecastStatus | None = None
    desired_replicas: int | None = Field(None, ge=0)
    current_replicas: int | None = Field(None, ge=0)
    ready_replicas: int | None = Field(None, ge=0)
    provisioned_gpus: int | None = Field(None, ge=0)
    """GPUs held ahead of demand by the provisioner (buffer, placeholders, requests)."""

    pending_gpus: int | None = Field(None, ge=0)
    """GPUs requested but not yet on Ready nodes."""

    draining_pods: list[str] = Field(default_factory=list)
    last_scale_time: str | None = Field(None, json_schema_extra={"format": "date-time"})
    last_scale_reason: str | None = None
    measured_lead_time: MeasuredLeadTime | None = None
    conditions: list[Condition] = Field(default_factory=list)


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta the controller reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=_camel)

    name: str = Field(min_length=1, max_length=253)
    namespace: str = "default"
    generation: int | None = None
    resource_version: str | None = None
    uid: str | None = None


class ScalingPolicy(BaseModel):
    """A whole ScalingPolicy object as stored by the API server."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=_camel)

    api_version: Literal["forestall.dev/v1alpha1"] = API_VERSION
    kind: Literal["ScalingPolicy"] = KIND
    metadata: ObjectMeta
    spec: ScalingPolicySpec
    status: ScalingPolicyStatus | None = None


def parse(obj: Any) -> ScalingPolicy:
    """Validate a decoded ScalingPolicy document.

    Raises:
        errors.InvalidPolicy: with one line per problem, each naming the field, the value and the fix.
    """
    try:
        return ScalingPolicy.model_validate(obj)
    except ValidationError as exc:
        raise errors.InvalidPolicy(format_errors(exc)) from exc


def format_errors(exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into `field.path: message, got value` lines."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        if err["type"] == "extra_forbidden":
            msg = "unknown field: remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required field is missing"
        if err["type"] in ("missing", "value_error") or "got" in msg:
            lines.append(f"{loc}: {msg}" if loc else msg)
        else:
            lines.append(f"{loc}: {msg}, got {err['input']!r}")
    return lines
