"""The generated CRD is one a real API server accepts: every CEL rule compiles and is cheap by its bounds.

kube-apiserver estimates each rule's worst-case cost from the schema's `maxItems`/`maxLength` and refuses a
CRD over budget (an unbounded list costs about 90,000 items, an unbounded string about 3 MiB). The
`capacity.gpuTypes` uniqueness rule, O(n^2) over an unbounded list of unbounded names, was refused that
way; the list is now a map list keyed by name, which the API server keeps unique itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import celpy

from controller import crd
from tests.fakes import crd_schema
from tests.fakes.kube_api import cel_cost, scaling_policy

Obj = dict[str, Any]

OLD_GPU_TYPES_RULE = (
    "!has(self.gpuTypes) || self.gpuTypes.all(a, self.gpuTypes.exists_one(b, b.name == a.name))"
)
"""The rule the API server refused: kept here to show the fake's cost check refuses it too."""


def _rule_nodes(node: Obj, path: str = "") -> Iterator[tuple[str, Obj]]:
    if node.get("x-kubernetes-validations"):
        yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _rule_nodes(sub, f"{path}.{name}")
    if "items" in node:
        yield from _rule_nodes(node["items"], f"{path}[]")


def _subtree(node: Obj, path: str) -> Iterator[tuple[str, Obj]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _subtree(sub, f"{path}.{name}")
    if "items" in node:
        yield from _subtree(node["items"], f"{path}[]")


def unbounded(schema: Obj) -> list[str]:
    """Lists under a rule without maxItems, and strings a rule names without maxLength (or an enum)."""
    out = []
    for path, node in _rule_nodes(schema):
        for sub_path, sub in _subtree(node, path):
            if sub.get("type") == "array" and "maxItems" not in sub:
                out.append(f"{sub_path}: a list under a CEL rule needs maxItems")
        for rule in node["x-kubernetes-validations"]:
            for ref, named in _named(rule["rule"], node):
                if named is None:
                    out.append(f"{path}: rule {rule['rule']!r} names {ref}, which the schema does not have")
                elif named.get("type") == "string" and "maxLength" not in named and not named.get("enum"):
                    out.append(f"{path}: rule {rule['rule']!r} names string {ref} without maxLength")
    return out


def _named(rule: str, node: Obj) -> list[tuple[str, Obj | None]]:
    """Every field path the rule names (`self.a.b`, or `x.name` with `x` a macro's variable), resolved."""
    env: dict[str, Obj] = {"self": node}
    for receiver, _macro, variable in cel_cost.MACRO.findall(rule):
        env[variable] = (cel_cost.resolve(receiver, env) or {}).get("items", {})
    refs = {
        m.group(1) for m in re.finditer(r"\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\()?", rule) if not m.group(2)
    }
    refs |= {
        m.group(1).rsplit(".", 1)[0]
        for m in re.finditer(r"\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\(", rule)
        if "." in m.group(1).rsplit(".", 1)[0] or m.group(1).split(".")[0] in env
    }
    return [(ref, cel_cost.resolve(ref, env)) for ref in sorted(refs) if ref.split(".")[0] in env]


def _spec_schema() -> Obj:
    return crd_schema.crd_schema(crd.definition())


def test_no_rule_touches_an_unbounded_list_or_string() -> None:
    assert unbounded(_spec_schema()) == []


def test_the_walk_finds_the_rule_that_was_refused() -> None:
    """Regression: without bounds, the old uniqueness rule on gpuTypes is what a real API server refused."""
    schema = _spec_schema()
    capacity = schema["properties"]["spec"]["properties"]["capacity"]
    capacity["x-kubernetes-validations"] = [{"rule": OLD_GPU_TYPES_RULE, "message": "unique"}]
    del capacity["properties"]["gpuTypes"]["maxItems"]
    assert unbounded(schema) == [".spec.capacity.gpuTypes: a list under a CEL rule needs maxItems"]


def test_every_rule_compiles() -> None:
    env = celpy.Environment()
    rules = [r["rule"] for _, node in _rule_nodes(_spec_schema()) for r in node["x-kubernetes-validations"]]
    assert rules, "the CRD has CEL rules"
    for rule in rules:
        env.compile(rule)  # raises CELParseError on a rule the API server could not compile


def test_generated_crd_is_within_the_cost_budget() -> None:
    assert cel_cost.problems(crd.definition()) == []


def test_cost_check_refuses_the_quadratic_rule_on_an_unbounded_list() -> None:
    definition = crd.definition()
    capacity = crd_schema.crd_schema(definition)["properties"]["spec"]["properties"]["capacity"]
    capacity["x-kubernetes-validations"] = [{"rule": OLD_GPU_TYPES_RULE, "message": "unique"}]
    gpu_types = capacity["properties"]["gpuTypes"]
    del gpu_types["maxItems"], gpu_types["items"]["properties"]["name"]["maxLength"]
    problems = cel_cost.problems(definition)
    assert len(problems) == 2 and "estimated rule cost exceeds budget" in problems[0]
    # the same rule with the bounds the model now sets is cheap
    gpu_types["maxItems"] = 16
    gpu_types["items"]["properties"]["name"]["maxLength"] = 63
    assert cel_cost.problems(definition) == []


def test_duplicate_gpu_type_names_are_refused_by_the_list_map() -> None:
    doc = scaling_policy("chat", "llm")
    doc["spec"]["capacity"]["gpuTypes"] = [
        {"name": "H100", "streamsPerReplica": 32},
        {"name": "H100", "streamsPerReplica": 16},
    ]
    problems = crd_schema.validate(_spec_schema(), doc)
    assert problems == ["spec.capacity.gpuTypes[1]: Duplicate value: ('H100',)"]
