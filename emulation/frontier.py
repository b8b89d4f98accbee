"""`forestall simulate --sweep FIELD=V1,V2,...`: one policy field varied, one run per value, the frontier drawn.

An operator tunes a policy by trading SLO attainment against GPU-hours (`forecast.quantile`,
`scaleDown.stabilizationWindowSeconds`, `leadTime.horizonSeconds`...). This module sets any field of the
ScalingPolicy spec by its dotted path (wire names, `forecast.quantile`, or Python names,
`scale_down.stabilization_window_s`), re-validates the whole spec through the one model tree (so a swept value
gets exactly the error `forestall validate` would give), runs the simulator once per value on the same streams
(same trace, scale and seed), and reports one row per value. The baselines and the oracles do not depend on the
swept field, so they run once, with the first value. `plot_frontier` draws SLO attainment against GPU-hours:
Forestall's points joined in sweep order and labelled with their value, next to reactive, reactive-ca, oracle
and oracle-lead.

What this module does not do: parse the command line or print tables (`emulation.simulate_cli`), or search for
the best value (the operator picks the point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controller import errors, policy
from emulation import results, simulate, traces


@dataclass(frozen=True)
class Sweep:
    """A parsed `--sweep`: the field's wire path (as written in a ScalingPolicy) and the values to try."""

    field: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]
    """Each value as the operator wrote it (for the table and the plot)."""


@dataclass
class SweepResult:
    """One `SimResult` per swept value (the first also carries the baselines and the oracles)."""

    sweep: Sweep
    runs: list[results.SimResult]


def parse_sweep(text: str) -> Sweep:
    """`forecast.quantile=0.8,0.9` -> Sweep; values are YAML scalars (numbers, true/false, strings).

    Raises:
        ValueError: no `=`, no field, or no value, with the expected form in the message.
    """
    field, sep, raw = text.partition("=")
    field = field.strip()
    labels = tuple(v.strip() for v in raw.split(",") if v.strip())
    if not sep or not field or not labels:
        raise ValueError(
            f"--sweep must be FIELD=V1,V2,... (e.g. forecast.quantile=0.8,0.9,0.95), got {text!r}"
        )
    values = []
    for label in labels:
        try:
            values.append(yaml.safe_load(label))
        except yaml.YAMLError:
            values.append(label)
    return Sweep(field=field, values=tuple(values), labels=labels)


def with_field(spec: policy.ScalingPolicySpec, field: str, value: Any) -> policy.ScalingPolicySpec:
    """`spec` with the field at dotted path `field` set to `value`, validated as a whole.

    Each part of the path may be the wire name (`scaleDown`) or the Python name (`scale_down`).

    Raises:
        ValueError: the path names no field of the spec (the message lists the fields at that level).
        errors.InvalidPolicy: the value is not valid for the field (pydantic's message, as `validate` gives).
    """
    doc = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    model: type[Any] = type(spec)
    node: dict[str, Any] = doc
    parts = field.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if not fields:
            raise ValueError(f"--sweep {field}: {'.'.join(parts[:i])} has no fields to set")
        wire = _wire_name(model, part)
        if wire is None:
            known = ", ".join(sorted(f.alias or n for n, f in fields.items()))
            where = ".".join(parts[:i]) or "the spec"
            raise ValueError(f"--sweep {field}: {where} has no field {part!r}; its fields are {known}")
        if i == len(parts) - 1:
            node[wire] = value
            break
        sub = node.get(wire)
        if not isinstance(sub, dict):
            sub = node[wire] = {}
        node = sub
        py_name = next(n for n, f in fields.items() if (f.alias or n) == wire)
        model = _model_of(fields[py_name].annotation)
    try:
        return policy.ScalingPolicySpec.model_validate(doc)
    except ValidationError as exc:
        raise errors.InvalidPolicy(policy.format_errors(exc)) from exc


def run(
    trace: traces.Trace,
    spec: policy.ScalingPolicySpec,
    sweep: Sweep,
    *,
    compare: Sequence[str],
    scale: float,
    seed: int,
    on_value: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Simulate each swept value on the same streams; baselines (`compare`) run with the first value only.

    Every spec is built (and validated) before the first run, so a bad value fails at once, not after hours.
    """
    specs = [with_field(spec, sweep.field, v) for v in sweep.values]
    runs = []
    for i, s in enumerate(specs):
        if on_value is not None:
            on_value(i, len(specs))
        policies = ["forestall", *compare] if i == 0 else ["forestall"]
        runs.append(simulate.simulate(trace, s, policies=policies, scale=scale, seed=seed))
    return SweepResult(sweep=sweep, runs=runs)


def rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per swept value, then one per baseline and oracle: the figures `to_json` gives per policy."""
    out: list[dict[str, Any]] = []
    for label, run_ in zip(result.sweep.labels, result.runs, strict=True):
        figures = run_.to_json()["policies"]
        assert isinstance(figures, dict)
        out.append({"policy": "forestall", result.sweep.field: label, **figures["forestall"]})
    first = result.runs[0].to_json()["policies"]
    assert isinstance(first, dict)
    out += [
        {"policy": name, result.sweep.field: None, **f} for name, f in first.items() if name != "forestall"
    ]
    return out


COLORS = {"reactive": "tab:orange", "reactive-ca": "tab:red", "oracle": "black", "oracle-lead": "tab:blue"}
MARKERS = {"reactive": "s", "reactive-ca": "D", "oracle": "*", "oracle-lead": "P"}


def plot_frontier(result: SweepResult, out: Path) -> None:
    """SLO attainment (y) against GPU-hours (x): the swept Forestall points beside the baselines and oracles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(result)
    fig, ax = plt.subplots(figsize=(10.5, 6), constrained_layout=True)
    ours = [r for r in table if r["policy"] == "forestall"]
    xs = [r["gpu_hours"] for r in ours]
    ys = [100 * r["slo_attainment"] for r in ours]
    ax.plot(xs, ys, "-o", color="tab:green", label=f"forestall, {result.sweep.field} swept", zorder=3)
    for r, x, y in zip(ours, xs, ys, strict=True):
        ax.annotate(f"{r[result.sweep.field]}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for r in table:
        name = r["policy"]
        if name == "forestall":
            continue
        ax.plot(
            [r["gpu_hours"]],
            [100 * r["slo_attainment"]],
            MARKERS.get(name, "x"),
            color=COLORS.get(name, "gray"),
            markersize=9,
            label=name,
            ls="none",
        )
    ax.set_xlabel("GPU-hours (whole nodes, request to release)")
    ax.set_ylabel("SLO attainment (%)")
    first = result.runs[0]
    ax.set_title(
        f"forestall simulate --sweep {result.sweep.field}: {Path(first.trace).name}, "
        f"scale {first.scale:.3g}, seed {first.seed}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a point
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _wire_name(model: type[Any], part: str) -> str | None:
    for name, f in model.model_fields.items():
        wire = f.alias or name
        if part in (wire, name):
            return str(wire)
    return None


def _model_of(annotation: Any) -> type[Any]:
    """The pydantic model inside a field's annotation (`Forecast`, `PrometheusDemand | None`)."""
    import types
    import typing

    candidates = [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        candidates = list(typing.get_args(annotation))
    for c in candidates:
        if isinstance(c, type) and hasattr(c, "model_fields"):
            return c
    return object
