"""The image and the distribution: the Dockerfile runs `forestall` as non-root, its build context builds the
wheel with every package and the bundled data, and the installed console script runs.

These are deploy checks (what ships), apart from the product's behaviour in `tests/unit` and
`tests/integration`; the manifests' own checks are in `test_manifests.py` beside this file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from controller import crd
from tests.deploy.test_manifests import INSTALLS, KUSTOMIZATIONS, ROOT, render


def test_console_script_runs_as_installed() -> None:
    """The entry point in pyproject is wired: the installed `forestall` prints the CRD."""
    out = subprocess.run(
        [Path(sys.executable).parent / "forestall", "crd"], capture_output=True, text=True, check=True
    )
    assert yaml.safe_load(out.stdout) == crd.definition()


def test_dockerfile_builds_a_non_root_forestall_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert stages and all(s == "python:3.11-slim" for s in stages)
    user = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["forestall"\]', text, flags=re.M)
    # The manifests run the image as the UID the image declares.
    uid = int(user[-1].split(":")[0])
    for name in INSTALLS:
        for obj in (o for o in render(KUSTOMIZATIONS[name]) if o["kind"] == "Deployment"):
            assert obj["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    # Every COPY source exists and is not excluded by .dockerignore.
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"


def test_dockerfile_build_context_builds_the_forestall_wheel(tmp_path: Path) -> None:
    """What the image's build stage does, minus Docker (no engine here): copy exactly the Dockerfile's
    COPY sources into an empty context and build the wheel from it. Proves the context is complete (README,
    the three packages, the generated CRD the wheel bundles) and the `forestall` entry point is declared."""
    text = (ROOT / "Dockerfile").read_text()
    build_stage = text.split("\nFROM ", 2)[1]
    context = tmp_path / "context"
    context.mkdir()
    for line in re.findall(r"^COPY (?!--from)(.+)$", build_stage, flags=re.M):
        *sources, dest = line.split()
        for source in sources:
            src = ROOT / source
            target = context / dest / src.name if dest.endswith("./") else context / dest
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(context),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("forestall-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "forestall = forestall.cli:main" in entry_points
    assert "controller/_manifests/crd/scalingpolicies.forestall.dev.yaml" in names
    for package in ("contract", "controller", "balancer", "forecast", "emulation", "forestall"):
        assert f"{package}/__init__.py" in names
    # The lab ships in the wheel so `forestall simulate` and `forestall demo` work from it, bundled trace included.
    assert "emulation/data/azure_llm_2024_conv_2days_30s.csv" in names
