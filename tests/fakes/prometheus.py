"""A real Prometheus server for tests: the Debian `prometheus` binary on a loopback port with a tmp data dir.

`running_prometheus(tmp_dir, ...)` starts it and stops it cleanly (SIGTERM, then kill after a grace period),
optionally with:

- backfilled history: `Sample` series written as OpenMetrics text and turned into TSDB blocks with
  `promtool tsdb create-blocks-from openmetrics` before the server starts (recorded demand, any age);
- scrape targets: `scrape_configs` as in prometheus.yml (e.g. a loopback exporter the test controls);
- a query log (`PrometheusServer.queries()`), so a test can check which ranges a client asked for.

The `prometheus` fixture-style helper skips the test with a reason when the binary is missing. Reused by the
controller's demand tests, the dashboards' tests and the end-to-end tests.

What it does not do: remote write, rules or alerting; add them to the config when a test needs them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from contract.clock import SYSTEM
from emulation import processes

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

READY_TIMEOUT_S = 30.0
"""Prometheus replays its WAL and loads blocks before /-/ready answers 200; seconds on a loaded machine."""

STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class Sample:
    """One series to backfill: metric name, labels, and its samples (unix seconds, values)."""

    name: str
    labels: Mapping[str, str]
    timestamps: np.ndarray
    values: np.ndarray


@dataclass
class PrometheusServer:
    """A running Prometheus: its base URL, data dir, process and query log."""

    url: str
    port: int
    data_dir: Path
    query_log: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """SIGTERM and wait; kill if it does not exit in time. Safe to call twice."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_GRACE_S)

    def queries(self) -> list[dict[str, Any]]:
        """The `params` of every query Prometheus answered, oldest first (from its query log)."""
        if not self.query_log.exists():
            return []
        out = []
        for line in self.query_log.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line)["params"])
        return out

    def query(self, promql: str, *, at_s: float | None = None) -> list[dict[str, Any]]:
        """An instant query through the HTTP API (for test assertions), the `result` list; at `at_s`
        (unix seconds) when given, else now."""
        params = {"query": promql} if at_s is None else {"query": promql, "time": f"{at_s:.3f}"}
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body: dict[str, Any] = json.load(resp)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


RECORDED_TRACE = "azure_llm_2024_conv_invocations_10s.csv"
"""Recorded demand for tests: the Azure 2024 LLM conversation series (arrivals per 10 s), in ../shared/data."""


def recorded_demand(hours: float) -> tuple[np.ndarray, np.ndarray]:
    """The first `hours` of the recorded Azure series (timestamps, values), skipping when the file is absent.

    The values are invocations per 10 s; tests read them as concurrent streams (same shape, same scale).
    """
    from forecast import series
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / RECORDED_TRACE
    if not path.exists():
        pytest.skip(f"{path} absent: recorded demand comes from ../shared/data (see its README)")
    s = series.read_csv(path)
    n = round(hours * 3600 / s.step_s)
    return s.timestamps[:n].copy(), s.values[:n].copy()


def per_backend(
    timestamps: np.ndarray,
    values: np.ndarray,
    *,
    backends: Sequence[str] = ("10.0.0.1:8000", "10.0.0.2:8000"),
    name: str = "forestall_balancer_active_streams",
    labels: Mapping[str, str] | None = None,
) -> list[Sample]:
    """Split a demand series over backends as the balancer's per-backend gauge reports it (sums back exactly)."""
    left = values.copy()
    out = []
    for i, address in enumerate(backends):
        share = left if i == len(backends) - 1 else np.floor(values / len(backends))
        left = left - share
        out.append(Sample(name, {**(labels or {}), "backend": address}, timestamps, share))
    return out


def require_prometheus() -> None:
    """Skip the calling test when the Prometheus binaries are not installed (Debian `prometheus`)."""
    for path in (PROMETHEUS, PROMTOOL):
        if shutil.which(path) is None:
            pytest.skip(f"{path} not installed: apt-get install -y prometheus (see scripts/setup)")


def write_openmetrics(path: Path, series: Sequence[Sample]) -> None:
    """OpenMetrics text for promtool: one family per metric name, samples in time order, `# EOF` last."""
    by_name: dict[str, list[Sample]] = {}
    for s in series:
        by_name.setdefault(s.name, []).append(s)
    with path.open("w") as out:
        for name, group in by_name.items():
            out.write(f"# TYPE {name} gauge\n")
            for s in group:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                head = f"{name}{{{labels}}}" if labels else name
                for t, v in zip(s.timestamps.tolist(), s.values.tolist(), strict=True):
                    if v == v:  # NaN: leave a gap, as a failed scrape would
                        out.write(f"{head} {v:g} {t:.3f}\n")
        out.write("# EOF\n")


def backfill(data_dir: Path, series: Sequence[Sample]) -> None:
    """Turn `series` into TSDB blocks in `data_dir` with promtool (before the server starts)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    text = data_dir.parent / "backfill.om"
    write_openmetrics(text, series)
    proc = subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(text), str(data_dir)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"promtool backfill failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")


@contextlib.contextmanager
def running_prometheus(
    tmp_dir: Path,
    *,
    series: Sequence[Sample] = (),
    scrape_configs: Sequence[Mapping[str, Any]] = (),
    scrape_interval_s: float = 1.0,
    port: int | None = None,
) -> Iterator[PrometheusServer]:
    """Start Prometheus (backfilled with `series`, scraping `scrape_configs`), yield it, stop it."""
    require_prometheus()
    data_dir = tmp_dir / "prometheus-data"
    if series:
        backfill(data_dir, series)
    data_dir.mkdir(parents=True, exist_ok=True)
    query_log = tmp_dir / "prometheus-queries.log"
    config = {
        "global": {
            "scrape_interval": f"{scrape_interval_s:g}s",
            "evaluation_interval": f"{scrape_interval_s:g}s",
            "query_log_file": str(query_log),
        },
        "scrape_configs": [dict(c) for c in scrape_configs],
    }
    config_path = tmp_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = port or processes.free_port()
    log = (tmp_dir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={data_dir}",
            "--storage.tsdb.retention.time=36500d",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = PrometheusServer(f"http://127.0.0.1:{port}", port, data_dir, query_log, process)
    try:
        _wait_ready(server, tmp_dir / "prometheus.log")
        yield server
    finally:
        server.stop()
        log.close()


def _wait_ready(server: PrometheusServer, log: Path) -> None:
    deadline = SYSTEM.monotonic() + READY_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"prometheus exited ({server.process.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if SYSTEM.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"prometheus not ready within {READY_TIMEOUT_S:g} s: {log.read_text()[-2000:]}"
            )
        # Poll readiness: waiting on the process returns at once if it dies, else after a short pause.
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=0.05)
