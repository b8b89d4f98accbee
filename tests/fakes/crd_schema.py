"""Evaluate a CRD's structural schema the way the API server does, for tests and the fake API server.

Steps, in the API server's order: apply `default`s (including `default: {}` objects, whose nested defaults
then apply), reject unknown fields (`fieldValidation=Strict`, kubectl's default), check the OpenAPI v3
keywords (JSON Schema draft 4 semantics: boolean `exclusiveMinimum`, as OpenAPI 3.0), then evaluate every
`x-kubernetes-validations` CEL rule with `self` bound to the object at that node, using the real CEL
implementation `cel-python`.

Returns a list of `path: message` strings; empty means the object is accepted.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema


def crd_schema(crd: dict[str, Any], version: str | None = None) -> dict[str, Any]:
    """The `openAPIV3Schema` of one version of a CRD (the storage version when none is named)."""
    for ver in crd["spec"]["versions"]:
        if (version is None and ver.get("storage")) or ver["name"] == version:
            schema: dict[str, Any] = ver["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"version {version!r} not in CRD")


def validate(schema: dict[str, Any], obj: Any) -> list[str]:
    """All the problems the API server would report for `obj`; `obj` is left untouched."""
    obj = apply_defaults(schema, copy.deepcopy(obj))
    problems = unknown_fields(schema, obj, "")
    validator = jsonschema.Draft4Validator(_strip_extensions(schema))
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path)
        problems.append(f"{path}: {err.message}")
    problems += list_keys(schema, obj, "")
    if not problems:
        problems.extend(_cel(schema, obj, ""))
    return problems


def list_keys(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    """Duplicates in `x-kubernetes-list-type: map` (by the map keys) and `set` lists, as the API server
    refuses them ("Duplicate value")."""
    out = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                out.extend(list_keys(sub, obj[name], f"{path}.{name}" if path else name))
    elif isinstance(obj, list) and "items" in schema:
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: list[Any] = []
        for index, item in enumerate(obj):
            here = f"{path}[{index}]"
            ident = tuple(item.get(k) for k in keys) if kind == "map" and isinstance(item, dict) else item
            if kind in ("map", "set"):
                if ident in seen:
                    out.append(f"{here}: Duplicate value: {ident!r}")
                seen.append(ident)
            out.extend(list_keys(schema["items"], item, here))
    return out


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Fill in defaults top-down, as the API server does on read and write."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_defaults(sub, obj[name])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


def unknown_fields(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    """Fields not declared in the schema (which Strict field validation rejects)."""
    out = []
    if isinstance(obj, dict) and schema.get("type") == "object" and "properties" in schema:
        props = schema["properties"]
        for name, value in obj.items():
            here = f"{path}.{name}" if path else name
            if name not in props:
                if not schema.get("x-kubernetes-preserve-unknown-fields"):
                    out.append(f'{here}: unknown field "{name}"')
            else:
                out.extend(unknown_fields(props[name], value, here))
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            out.extend(unknown_fields(schema["items"], item, f"{path}[{index}]"))
    return out


def _strip_extensions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_extensions(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if isinstance(schema, list):
        return [_strip_extensions(v) for v in schema]
    return schema


def _cel(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    out = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                out.extend(_cel(sub, obj[name], f"{path}.{name}" if path else name))
        env = celpy.Environment()
        for rule in schema.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            try:
                result = program.evaluate({"self": _to_cel(schema, obj)})
            except celpy.CELEvalError as exc:
                out.append(f"{path}: rule {rule['rule']!r} failed to evaluate: {exc.args[0]}")
                continue
            if isinstance(result, Exception) or not bool(result):
                out.append(f"{path}: {rule.get('message', rule['rule'])}")
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            out.extend(_cel(schema["items"], item, f"{path}[{index}]"))
    return out


def _to_cel(schema: dict[str, Any], value: Any) -> Any:
    """Typed CEL values: a `type: number` field is a CEL double even when written as 900 (as in the API server)."""
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): _to_cel(props.get(k, {}), v) for k, v in value.items()}
        )
    if isinstance(value, list):
        return celpy.celtypes.ListType([_to_cel(schema.get("items", {}), v) for v in value])
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celpy.celtypes.DoubleType(value)
    return celpy.json_to_cel(value)
