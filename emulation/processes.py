"""Local process and port helpers the lab shares: a free loopback port, a port probe, a process-group stopper.

`emulation.local` (worker processes), `emulation.demo` (balancer, metrics, Prometheus), `bench/` (proxies
under test) and `tests/` (Prometheus, servers) all start processes on ports of this machine; they use these
instead of each keeping a copy.

A free port is the OS's pick at the moment of asking: another process may take it before the caller binds it,
which is why callers that can hand a bound socket to their server (`tests.fakes.balancer_mcp`) do that instead.

What it does not do: pick ports off loopback, or supervise processes (a caller that starts one stops it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess

LOOPBACK = "127.0.0.1"

PROBE_TIMEOUT_S = 0.05
"""A connect to a loopback port answers in microseconds; 50 ms keeps a probe of a dead port from stalling a tick."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def listening(host: str, port: int | None) -> bool:
    """Whether something accepts connections on host:port (False for no port)."""
    if port is None:
        return False
    with socket.socket() as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        return sock.connect_ex((host, port)) == 0


def stop_process(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM a child's whole process group, SIGKILL it after `grace_s`; safe on a process already gone.

    The child must have been started with `start_new_session=True`, so its group is its own.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
