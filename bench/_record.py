"""Record a benchmark's figures in BENCHMARKS.md: the one way every script under bench/ writes results.

Each benchmark owns one section between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers and replaces
only that, under a file lock, so several benchmarks can record without clobbering each other. The section
gets the command that produced it, the commit and the machine, then the markdown the benchmark made.
"""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    """One line on where the figures come from: CPU model, cores, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(name: str, title: str, body: str, *, command: str | None = None) -> None:
    """Replace section `name` of BENCHMARKS.md (appending it if new) with `body` and its provenance."""
    command = command or "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    section = (
        f"<!-- {name}:start -->\n## {title}\n\n"
        f"Command: `{command}`  \nCommit: `{commit()}`  \nMachine: {machine()}\n\n"
        f"{body.strip()}\n<!-- {name}:end -->"
    )
    BENCHMARKS.touch()
    with BENCHMARKS.open("r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        text = fh.read()
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            text = head + section + tail
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        fh.seek(0)
        fh.truncate()
        fh.write(text)
