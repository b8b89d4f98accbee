"""A simplified form of kube-apiserver's static CEL cost check, run when a CRD is created.

The real API server (`apiextensions-apiserver`, `cel.Compile` with `checker.Cost`) estimates the worst-case
cost of every `x-kubernetes-validations` rule from the schema's bounds and refuses the CRD when one rule is
over `PER_RULE_LIMIT` or all rules together, each times the most times it can run (the cardinality of the
node it sits on), are over `PER_CRD_LIMIT`. The bounds it uses: `maxItems` for a list (else as many items
as fit in a maximal request), `maxLength` or the longest `enum` value for a string (else a maximal request).

This module keeps the part that decides whether a CRD like ours is accepted:

- a comprehension macro (`all`, `exists`, `exists_one`, `map`, `filter`) over a list costs the list's
  cardinality times (1 + the cost of its body), with the macro's variable bound to the list's items;
- a string compared with `==` or `!=` costs a tenth of its longest length (CEL's traversal factor);
- every other reference to a field costs 1.

What it does not model: the cost of functions (`size`, `matches`, `startsWith`, string concatenation),
`in` over a list, map iteration, `oldSelf` transition rules, `messageExpression`, or the exact per-node
cost of the CEL runtime. It estimates, to a factor of a few, what the real check estimates; a rule near
a limit must be checked on a real API server.
"""

from __future__ import annotations

import math
import re
from typing import Any

Obj = dict[str, Any]

MAX_REQUEST_BYTES = 3 * 1024 * 1024
"""Largest request body the API server accepts (3 MiB): the length of an unbounded string."""

UNBOUNDED_LIST_ITEMS = 90_000
"""Items an unbounded list of small objects is costed at (a maximal request over the smallest element)."""

PER_RULE_LIMIT = 10_000_000
"""`StaticEstimatedCostLimit`: the most one rule may cost per evaluation."""

PER_CRD_LIMIT = 100_000_000
"""`StaticEstimatedCRDCostLimit`: the most all rules of one CRD version may cost together."""

STRING_TRAVERSAL_FACTOR = 0.1
"""CEL charges a string comparison a tenth of the string's length."""

MACRO = re.compile(r"([A-Za-z_][\w.]*)\.(all|exists|exists_one|map|filter)\(\s*([A-Za-z_]\w*)\s*,")
_PATH = re.compile(r"(?<![\w.'\"])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|self)\b")
_COMPARE = re.compile(r"([A-Za-z_][\w.]*)\s*(?:==|!=)\s*([A-Za-z_][\w.]*)")


def problems(crd: Obj) -> list[str]:
    """What the API server's cost check would say about a CRD; empty when it is accepted."""
    out = []
    for version in crd.get("spec", {}).get("versions", []):
        schema = version.get("schema", {}).get("openAPIV3Schema", {})
        total = 0.0
        for path, rule, cost, runs in rule_costs(schema):
            if cost > PER_RULE_LIMIT:
                out.append(
                    f"{path}.x-kubernetes-validations: Forbidden: estimated rule cost exceeds budget by "
                    f"factor of {cost / PER_RULE_LIMIT:.1f}x (try simplifying the rule, or adding maxItems, "
                    f"maxProperties, and maxLength where arrays, maps, and strings are declared): {rule}"
                )
            total += cost * runs
        if total > PER_CRD_LIMIT:
            out.append(
                f"spec.versions[{version.get('name')}]: Forbidden: total CRD cost exceeds budget by factor "
                f"of {total / PER_CRD_LIMIT:.1f}x (try adding maxItems, maxProperties, and maxLength)"
            )
    return out


def rule_costs(
    schema: Obj, path: str = "openAPIV3Schema", runs: float = 1.0
) -> list[tuple[str, str, float, float]]:
    """(path, rule, estimated cost of one evaluation, most evaluations per object) of every rule."""
    out: list[tuple[str, str, float, float]] = []
    for rule in schema.get("x-kubernetes-validations", []):
        out.append((path, rule["rule"], estimate(rule["rule"], schema), runs))
    for name, sub in schema.get("properties", {}).items():
        out += rule_costs(sub, f"{path}.properties[{name}]", runs)
    if "items" in schema:
        out += rule_costs(schema["items"], f"{path}.items", runs * cardinality(schema))
    return out


def estimate(rule: str, schema: Obj, variables: dict[str, Obj] | None = None) -> float:
    """Estimated cost of one evaluation of `rule` with `self` bound to `schema`."""
    env = {"self": schema, **(variables or {})}
    match = MACRO.search(rule)
    if match is None:
        return _flat_cost(rule, env)
    start = match.end()
    depth, end = 1, start
    while end < len(rule) and depth:
        depth += {"(": 1, ")": -1}.get(rule[end], 0)
        end += 1
    body = rule[start : end - 1]
    receiver = resolve(match.group(1), env)
    items = (receiver or {}).get("items", {})
    inner = estimate(body, schema, {**env, match.group(3): items})
    macro_cost = cardinality(receiver or {}) * (1 + inner)
    rest = rule[: match.start()] + " 0 " + rule[end:]
    return macro_cost + estimate(rest, schema, variables)


def cardinality(schema: Obj) -> float:
    """Most items a list can hold, as the API server assumes it."""
    if schema.get("type") != "array":
        return 1.0
    return float(schema.get("maxItems", UNBOUNDED_LIST_ITEMS))


def max_length(schema: Obj) -> float:
    """Longest a string can be, as the API server assumes it."""
    if "maxLength" in schema:
        return float(schema["maxLength"])
    if schema.get("enum"):
        return float(max(len(str(v)) for v in schema["enum"]))
    return float(MAX_REQUEST_BYTES)


def resolve(path: str, env: dict[str, Obj]) -> Obj | None:
    """The schema a dotted path (`self.a.b`, `item.name`) names, or None when it names nothing known."""
    head, *rest = path.split(".")
    node = env.get(head)
    for part in rest:
        if node is None:
            return None
        node = node.get("properties", {}).get(part)
    return node


def _flat_cost(expr: str, env: dict[str, Obj]) -> float:
    cost = float(len(_PATH.findall(expr)))
    for left, right in _COMPARE.findall(expr):
        lengths = [
            max_length(s)
            for s in (resolve(left, env), resolve(right, env))
            if s and s.get("type") == "string"
        ]
        if lengths:
            cost += math.ceil(STRING_TRAVERSAL_FACTOR * max(lengths))
    return cost
