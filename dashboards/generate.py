"""Forestall's Grafana dashboards as files: `python -m dashboards.generate` rewrites the JSON beside it.

Three dashboards (`dashboards.panels` says which panels and queries; `dashboards.engine` renders them),
each a JSON file importable in Grafana (Dashboards > New > Import) or provisioned from a ConfigMap. The
JSON is checked in; `--check` (and a unit test) fails when a file differs from what the code renders.

`queries()` returns every (dashboard, panel, PromQL) read back from the generated JSON, so the integration
tests and the demo run exactly what Grafana will run, after `substitute()` fills in the template variables
(`SUBSTITUTIONS` are the values used outside Grafana).

What this module does not do: define panels or render JSON (see above), or talk to Grafana or Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dashboards import engine, panels

OUT_DIR = Path(__file__).resolve().parent
"""The generated JSON lives beside the generator, checked in."""

SUBSTITUTIONS = engine.SUBSTITUTIONS
substitute = engine.substitute
"""Kept here too: the demo and the tests read a dashboard's queries and fill them in through this module."""


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write every dashboard's JSON into `out_dir`; returns the paths written."""
    paths = []
    for spec in panels.DASHBOARDS:
        path = out_dir / spec.filename
        path.write_text(engine.render(spec))
        paths.append(path)
    return paths


def queries(out_dir: Path = OUT_DIR) -> list[tuple[str, str, str]]:
    """Every (dashboard title, panel title, PromQL) in the generated JSON files, in panel order."""
    out = []
    for spec in panels.DASHBOARDS:
        data = json.loads((out_dir / spec.filename).read_text())
        for panel in data["panels"]:
            for target in panel.get("targets", []):
                out.append((data["title"], panel["title"], target["expr"]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dashboards.generate [--check]`: write the JSON, or with --check report stale files."""
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.generate", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="directory for the JSON files")
    args = parser.parse_args(argv)
    if args.check:
        stale = [
            s.filename for s in panels.DASHBOARDS if not _same(args.out_dir / s.filename, engine.render(s))
        ]
        for name in stale:
            print(f"{name} is stale: run `python -m dashboards.generate`", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(args.out_dir):
        print(path)
    return 0


def _same(path: Path, text: str) -> bool:
    return path.exists() and path.read_text() == text


if __name__ == "__main__":
    sys.exit(main())
