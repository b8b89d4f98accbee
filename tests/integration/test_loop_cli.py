"""`forestall controller` as a process: kubeconfig, leader election, status, clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp

from emulation.processes import free_port
from forestall import cli
from tests.conftest import ROOT
from tests.fakes import kube_api
from tests.fakes.kube_api import FakeKubeApi, eventually

NS = "llm"


def test_every_controller_option_has_help() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._subparsers._group_actions if hasattr(a, "choices"))  # type: ignore[union-attr]
    controller = sub.choices["controller"]
    options = [a for a in controller._actions if a.dest != "help"]
    assert {a.dest for a in options} >= {
        "kubeconfig",
        "namespace",
        "interval_s",
        "metrics_port",
        "leader_election",
        "leader_election_id",
        "leader_election_namespace",
        "dry_run",
    }
    assert [a.dest for a in options if not a.help] == []


async def test_controller_process_reconciles_holds_the_lease_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    async with FakeKubeApi(bookmark_interval_s=0.2) as api:
        api.put(kube_api.deployment("chat", NS, replicas=3))
        api.put(
            kube_api.scaling_policy(
                "chat", NS, demand={"prometheus": {"url": "http://127.0.0.1:9", "query": "sum(streams)"}}
            )
        )
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{api.url}'}}}}]\n"
            "users: [{name: test, user: {token: t}}]\n"
            "contexts: [{name: test, context: {cluster: fake, user: test}}]\n"
            "current-context: test\n"
        )
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forestall.cli",
            "controller",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            NS,
            "--metrics-port",
            str(port),
            "--metrics-address",
            "127.0.0.1",
            "--leader-election-namespace",
            NS,
            "--identity",
            "cli-test",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:

            def status() -> dict[str, object]:
                obj = api.get("forestall.dev", "scalingpolicies", NS, "chat") or {}
                return obj.get("status") or {}

            await eventually(lambda: "conditions" in status(), "the controller's first status", timeout_s=60)
            conditions = {c["type"]: c for c in status()["conditions"]}  # type: ignore[attr-defined]
            assert conditions["Ready"]["status"] == "True"
            assert conditions["DemandDataAvailable"]["status"] == "False"  # Prometheus is not there
            lease = api.get("coordination.k8s.io", "leases", NS, "forestall-controller")
            assert lease is not None and lease["spec"]["holderIdentity"] == "cli-test"
            deployment = api.get("apps", "deployments", NS, "chat")
            assert deployment is not None and deployment["spec"]["replicas"] == 3  # missing data: held
            async with aiohttp.ClientSession() as session:
                for path in ("/healthz", "/readyz", "/metrics"):
                    async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                        assert resp.status == 200, (path, await resp.text())
                        if path != "/metrics":
                            assert await resp.text() == "ok\n"
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, output.decode()[-2000:]
        lease = api.get("coordination.k8s.io", "leases", NS, "forestall-controller")
        assert lease is not None and "holderIdentity" not in lease["spec"]  # released on SIGTERM
        assert api.rejected == []
