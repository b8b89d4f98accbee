"""`forestall crd` and `forestall validate`: the ScalingPolicy API from the command line.

`validate` reads YAML files (several documents per file allowed, `---`), validates every ScalingPolicy in
them with the same pydantic model the controller uses, and prints one line per problem naming the file, the
document, the field, the value and the fix. Documents of other kinds are skipped with a note, so a whole
kustomize output can be piped in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from controller import crd, errors, policy


def add_parser(sub: Any) -> None:
    """Register `crd` and `validate`."""
    p_crd = sub.add_parser(
        "crd",
        help="print the ScalingPolicy CustomResourceDefinition (YAML)",
        description="Print the ScalingPolicy CRD generated from the pydantic models. "
        "Apply it with `forestall crd | kubectl apply -f -`.",
    )
    p_crd.add_argument(
        "--output", "-o", type=Path, default=None, metavar="FILE", help="write to FILE instead of stdout"
    )
    p_crd.set_defaults(func=run_crd)

    p_val = sub.add_parser(
        "validate",
        help="validate ScalingPolicy YAML files",
        description="Validate ScalingPolicy YAML files with the controller's own model. Prints one line per "
        "problem (file, document, field, value, fix). Exit 0 when all are valid, 1 when any is not.",
    )
    p_val.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="YAML file(s); `-` reads standard input"
    )
    p_val.add_argument("--quiet", "-q", action="store_true", help="print only problems, not the OK lines")
    p_val.set_defaults(func=run_validate)


def run_crd(args: argparse.Namespace) -> int:
    text = crd.render()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        for where, problems in validate_file(path):
            if problems:
                bad += 1
                for line in problems:
                    print(f"{where}: {line}")
            elif not args.quiet:
                print(f"{where}: valid")
    return 1 if bad else 0


def validate_file(path: Path) -> list[tuple[str, list[str]]]:
    """Validate every ScalingPolicy document in one file: `(where, problems)` per document."""
    label = "<stdin>" if str(path) == "-" else str(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        return [(label, [f"cannot read file: {exc.strerror}"])]
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        return [(label, [f"not valid YAML: {exc}"])]
    results = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{label}[{index}]" if len(docs) > 1 else label
        if not isinstance(doc, dict):
            results.append((where, [f"expected a mapping (a Kubernetes object), got {type(doc).__name__}"]))
            continue
        if doc.get("kind") != policy.KIND:
            if len(docs) == 1:
                results.append((where, [f"kind: expected {policy.KIND!r}, got {doc.get('kind')!r}"]))
            continue
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        where = f"{where} ({name})" if name else where
        try:
            policy.parse(doc)
        except errors.InvalidPolicy as exc:
            results.append((where, exc.lines))
        else:
            results.append((where, []))
    return results
