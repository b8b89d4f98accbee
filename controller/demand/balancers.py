"""The balancers' live view of one policy: `/signals` asked of every balancer replica at once and merged.

`fetch_signals` asks every replica concurrently, each under a short timeout, and merges the answers with
`contract.signals.merge` into a `decide.SignalsSnapshot`. Replicas that do not answer, answer garbage, or
answer with a report older than `staleAfterSeconds` are named in the snapshot's `unreachable` and in
`errors`: the sums are then a lower bound, which `decide()` uses to scale up but never to scale down. The
replica addresses come from the balancer Service's EndpointSlices (the kube layer lists them;
`replica_addresses` formats them).

What this module does not do: find the replicas (the caller passes their addresses) or keep a history
(`controller.demand.history`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pydantic

from contract import signals as signals_mod
from controller import decide, errors

SIGNALS_TIMEOUT_S = 2.0
"""Per balancer replica; a replica slower than this is counted as unreachable for the cycle."""

SIGNALS_MAX_BYTES = 4 * 1024 * 1024
"""A `/signals` body larger than this is refused (about 10,000 backends; anything bigger is a fault)."""


@dataclass(frozen=True)
class SignalsReading:
    """The merged signals (None when no replica gave a usable report) and one line per replica that did not."""

    snapshot: decide.SignalsSnapshot | None
    errors: tuple[str, ...] = ()
    replicas: int = 0
    """Replicas asked."""


def signals_session(*, timeout_s: float, ca_file: Path | None = None) -> aiohttp.ClientSession:
    """The HTTP session that reads balancer signals; `ca_file` verifies their admin certificates (https)."""
    ssl_ctx: ssl.SSLContext | bool = True
    if ca_file is not None:
        ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s), connector=aiohttp.TCPConnector(ssl=ssl_ctx)
    )


async def fetch_signals(
    session: aiohttp.ClientSession,
    replicas: Sequence[str],
    *,
    now: float,
    stale_after_s: float,
    timeout_s: float = SIGNALS_TIMEOUT_S,
    path: str = "/signals",
    headers: Mapping[str, str] | None = None,
    scheme: str = "http",
) -> SignalsReading:
    """Ask every replica (`host:port`) for its signals at once and merge the fresh, valid answers.

    `scheme` is "https" when the balancers serve their admin listener with TLS (`admin_tls_cert`); the session
    then carries the CA that verifies them (`Demands(signals_ca_file=...)`).
    """
    if not replicas:
        return SignalsReading(None, ("no balancer replicas found (the Service has no ready endpoints)",), 0)
    answers = await asyncio.gather(
        *(
            _fetch_one(session, r, path=path, timeout_s=timeout_s, headers=headers, scheme=scheme)
            for r in replicas
        )
    )
    reports: list[signals_mod.Signals] = []
    errors: list[str] = []
    bad: list[str] = []
    for replica, answer in zip(replicas, answers, strict=True):
        if isinstance(answer, str):
            errors.append(f"balancer {replica}: {answer}")
            bad.append(replica)
        elif now - answer.time > stale_after_s:
            errors.append(
                f"balancer {replica}: report is {now - answer.time:.0f} s old (stale after {stale_after_s:g} s)"
            )
            bad.append(replica)
        else:
            reports.append(answer)
    if not reports:
        return SignalsReading(None, tuple(errors), len(replicas))
    snapshot = decide.SignalsSnapshot(
        time_s=min(r.time for r in reports),
        backends=signals_mod.merge(reports),
        admission_queue=sum(r.admission_queue for r in reports),
        rejected_streams_total=sum(r.rejected_streams_total for r in reports),
        unreachable=tuple(bad),
    )
    return SignalsReading(snapshot, tuple(errors), len(replicas))


async def _fetch_one(
    session: aiohttp.ClientSession,
    replica: str,
    *,
    path: str,
    timeout_s: float,
    headers: Mapping[str, str] | None,
    scheme: str = "http",
) -> signals_mod.Signals | str:
    """One replica's report, or a sentence saying why there is none."""
    url = f"{scheme}://{replica}{path}"
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                body = await _read_capped(resp)
                if resp.status != 200:
                    return f"GET {path} answered HTTP {resp.status}: {errors.one_line(body.decode('utf-8', 'replace'))}"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        return f"unreachable: {errors.one_line(str(exc) or type(exc).__name__)}"
    except _TooLarge:
        return f"/signals body larger than {SIGNALS_MAX_BYTES} bytes"
    try:
        return signals_mod.Signals.model_validate_json(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return f"malformed /signals ({exc.error_count()} errors; {where}: {first['msg']})"


class _TooLarge(Exception):
    pass


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > SIGNALS_MAX_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def replica_addresses(ips: Sequence[str], port: int) -> list[str]:
    """`host:port` for each endpoint address of the balancer Service (IPv6 in brackets)."""
    out = []
    for ip in ips:
        try:
            v6 = ipaddress.ip_address(ip).version == 6
        except ValueError:
            v6 = False  # a hostname (EndpointSlice addressType FQDN)
        out.append(f"[{ip}]:{port}" if v6 else f"{ip}:{port}")
    return out
