"""TLS: the listener from certificate files with optional mutual TLS, and TLS (with a client certificate) to
backends; plain clients and clients without a certificate are refused."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from emulation import worker as backend_emulator
from tests.fakes.balancer_env import balancer, completion_body, read_sse
from tests.fakes.balancer_tls import make_pki


async def test_mutual_tls_on_the_listener_and_to_the_backend(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    app = backend_emulator.create_app(slots=2, ttft_s=0.0, seconds_per_token=0.0)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server_context(require_client_cert=True))
    await site.start()
    backend = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with balancer(
            [backend],
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_client_ca=pki.ca,
            backend_tls=True,
            backend_ca=pki.ca,
            backend_cert=pki.client_cert,
            backend_key=pki.client_key,
        ) as lb:
            url = lb.url.replace("http://", "https://") + "/v1/completions"
            connector = aiohttp.TCPConnector(ssl=pki.client_context(with_cert=True))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.post(url, json=completion_body()) as resp:
                    assert resp.status == 200
                    assert (await read_sse(resp))[-1] == "[DONE]"
            no_cert = aiohttp.TCPConnector(ssl=pki.client_context(with_cert=False))
            async with aiohttp.ClientSession(connector=no_cert) as http:
                with pytest.raises(aiohttp.ClientError):
                    async with http.post(url, json=completion_body()) as resp:
                        await resp.read()
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError):
                    async with http.post(lb.url + "/v1/completions", json=completion_body()) as resp:
                        await resp.read()
            assert lb.bal.pool.backends[backend].completed == 1
    finally:
        await runner.cleanup()


async def test_admin_tls_is_separate_and_the_controller_reads_signals_over_https(tmp_path: Path) -> None:
    """M5: turning on client TLS also put TLS on the admin listener, which the controller (hard-coded http://)
    and the probes could not read, so capacity was held forever."""
    from contract import clock as clock_mod
    from controller.demand import balancers, registry

    pki = make_pki(tmp_path)
    now = clock_mod.SYSTEM.now()
    async with balancer(["127.0.0.1:9"], tls_cert=pki.server_cert, tls_key=pki.server_key) as lb:
        replica = lb.admin_url.removeprefix("http://")
        async with balancers.signals_session(timeout_s=5.0) as http:
            reading = await balancers.fetch_signals(http, [replica], now=now, stale_after_s=60.0)
        assert reading.snapshot is not None, reading.errors  # client TLS left the admin listener plain
    async with balancer(["127.0.0.1:9"], admin_tls_cert=pki.server_cert, admin_tls_key=pki.server_key) as lb:
        replica = lb.admin_url.removeprefix("http://")
        async with balancers.signals_session(timeout_s=5.0, ca_file=pki.ca) as http:
            reading = await balancers.fetch_signals(
                http, [replica], now=now, stale_after_s=60.0, scheme="https"
            )
            assert reading.snapshot is not None, reading.errors
            plain = await balancers.fetch_signals(http, [replica], now=now, stale_after_s=60.0)
            assert plain.snapshot is None  # the admin listener now speaks TLS only
        async with balancers.signals_session(timeout_s=5.0) as http:  # no CA: the certificate is not trusted
            untrusted = await balancers.fetch_signals(
                http, [replica], now=now, stale_after_s=60.0, scheme="https"
            )
            assert untrusted.snapshot is None and "unreachable" in untrusted.errors[0]
    with pytest.raises(ValueError, match="signals_scheme must be 'http' or 'https'"):
        registry.Demands(signals_scheme="ftp")
