"""Pure parts of the balancer under a FakeClock: config messages, failure detection, ejection, bounded loads,
consistent hashing, warm-up, hotspots, retry budget and scraped queues."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer import config as config_mod
from balancer import health, reporting, scraping, sessions
from balancer.config import BackendSpec
from balancer.errors import ConfigError
from balancer.runtime import Balancer
from contract import clock as clock_mod


def _balancer(n: int = 3, *, clock: clock_mod.FakeClock | None = None, **settings: object) -> Balancer:
    values: dict[str, object] = {"backends": [{"address": f"10.0.0.{i}:80"} for i in range(n)], **settings}
    return Balancer(config_mod.BalancerConfig.model_validate(values), clock=clock or clock_mod.FakeClock())


def test_config_errors_name_the_field_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"idle_timeout_s: Input should be greater than 0 \(got -1\)"):
        config_mod.build(env={}, overrides={"idle_timeout_s": -1, "backends_file": tmp_path / "b.yaml"})
    with pytest.raises(ConfigError, match="no backends"):
        config_mod.build(env={})
    with pytest.raises(ConfigError, match="FORESTALL_BALANCER_NOPE is not a balancer setting"):
        config_mod.build(env={"FORESTALL_BALANCER_NOPE": "1"})
    with pytest.raises(ConfigError, match=r"base_ejection_s \(500.0\) must be <= max_ejection_s"):
        config_mod.build(env={}, overrides={"base_ejection_s": 500, "kube_services": ["ns/svc"]})
    path = tmp_path / "backends.yaml"
    path.write_text("backends:\n  - {address: 10.0.0.1:80}\n  - {address: 10.0.0.1:80}\n")
    with pytest.raises(ConfigError, match="listed twice"):
        config_mod.load_backends_file(path)
    path.write_text("backends: [{address: 'no-port'}]")
    with pytest.raises(ConfigError, match="expected host:port"):
        config_mod.load_backends_file(path)


def test_config_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "balancer.yaml"
    path.write_text("idle_timeout_s: 100\nsession_epsilon: 0.5\nkube_services: [a/b]\n")
    config = config_mod.build(
        file=path, env={"FORESTALL_BALANCER_SESSION_EPSILON": "0.75"}, overrides={"idle_timeout_s": 200.0}
    )
    assert (config.idle_timeout_s, config.session_epsilon, config.kube_services) == (200.0, 0.75, ["a/b"])


@pytest.mark.parametrize(
    ("first", "last", "content_type", "reason"),
    [
        (b'{"jsonrpc":"2.0","id":1,"error":{"code":-1}}', b"", "application/json", "jsonrpc_error"),
        (b'{"jsonrpc":"2.0","id":1,"result":{"isError":true}}', b"", "application/json", "jsonrpc_error"),
        (b'{"jsonrpc":"2.0","id":1,"result":{"isError":false}}', b"", "application/json", None),
        (
            b'event: message\ndata: {"jsonrpc":"2.0","id":2,"error":{}}\n\n',
            b"",
            "text/event-stream",
            "jsonrpc_error",
        ),
        (b"data: {}\n\n", b'data: {"error": {"message": "oom"}}\n\n', "text/event-stream", "sse_error"),
        (b'data: {"text": "an error happened"}\n\n', b"data: [DONE]\n\n", "text/event-stream", None),
        (b"<html>error</html>", b"", "text/html", None),
    ],
)
def test_errors_hidden_in_200s_are_found(
    first: bytes, last: bytes, content_type: str, reason: str | None
) -> None:
    assert health.response_error(first, last or first, content_type=content_type) == reason


TOOL_FAILED = b'{"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": true}}'
INTERNAL = b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "boom"}}'
BAD_PARAMS = b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "bad"}}'


@pytest.mark.parametrize(
    ("status", "body", "mcp", "in_session", "verdict"),
    [
        (200, TOOL_FAILED, True, True, ("client_error", False)),
        (200, TOOL_FAILED, True, False, ("client_error", False)),
        (200, INTERNAL, True, True, ("client_error", False)),  # inside the client's own session
        (200, INTERNAL, True, False, ("jsonrpc_error", True)),  # stateless: a sick backend
        (200, BAD_PARAMS, True, False, ("client_error", False)),
        (200, INTERNAL, False, False, ("jsonrpc_error", True)),  # not MCP: as before
        (404, b"{}", True, True, ("client_error", False)),
        (429, b"{}", False, False, ("client_error", False)),
        (502, b"{}", True, True, ("status_502", True)),
        (200, b'{"jsonrpc": "2.0", "id": 1, "result": {}}', True, False, None),
    ],
)
def test_blame_separates_client_caused_errors_from_backend_faults(
    status: int, body: bytes, mcp: bool, in_session: bool, verdict: tuple[str, bool] | None
) -> None:
    """H1: a client's failing tool calls in its own session must never eject the backend."""
    got = health.blame(
        body, body, status=status, content_type="application/json", mcp=mcp, in_session=in_session
    )
    assert got == verdict


def test_ejection_grows_and_never_takes_more_than_the_allowed_fraction() -> None:
    fake = clock_mod.FakeClock()
    bal = _balancer(2, clock=fake, consecutive_failures=2, base_ejection_s=5.0, max_ejection_s=12.0)
    a, b = bal.pool.backends.values()
    assert not bal.outliers.failure(a, "connect")
    bal.outliers.success(a)  # a success resets the count
    assert not bal.outliers.failure(a, "connect")
    assert bal.outliers.failure(a, "connect")
    assert a.state(fake.monotonic()) == "ejected"
    bal.outliers.failure(b, "connect")
    assert not bal.outliers.failure(b, "connect")  # 2 of 2 would exceed max_ejected_fraction=0.5
    fake.advance(5.0)
    assert a.state(fake.monotonic()) == "ready"
    bal.outliers.failure(a, "reset")
    assert bal.outliers.failure(a, "reset")
    assert a.ejected_until_s == fake.monotonic() + 10.0
    fake.advance(10.0)
    bal.outliers.failure(a, "reset")
    bal.outliers.failure(a, "reset")
    assert a.ejected_until_s == fake.monotonic() + 12.0  # capped
    assert a.failed == {"connect": 3, "reset": 4}


def test_retry_budget_allows_min_then_a_ratio_of_requests() -> None:
    budget = health.RetryBudget(ratio=0.5, min_retries=2)
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    budget.on_request()
    budget.on_request()
    assert budget.try_spend() and not budget.try_spend()


def test_new_sessions_respect_the_bounded_load() -> None:
    bal = _balancer(2, session_epsilon=0.25)
    a, b = bal.pool.backends.values()
    a.sessions, b.sessions = 10, 2
    assert [x.address for x in sessions.under_bound([a, b], epsilon=0.25)] == [b.address]
    a.sessions = b.sessions = 0
    for i in range(20):
        backend = bal.choose(new_session=True)
        assert backend is not None
        bal.sessions.bind(f"session-{i}", backend)
    assert (a.sessions, b.sessions) == (10, 10)


def test_sealed_session_routes_to_its_backend_and_restores_its_id() -> None:
    bal = _balancer(2)
    sealed = bal.seal.seal("10.0.0.1:80", "backend-own-id")
    assert sealed.isascii() and "10.0.0.1" not in sealed and "backend-own-id" not in sealed
    route = bal.open_session(sealed)
    assert route.refusal is None and route.backend is bal.pool.backends["10.0.0.1:80"]
    assert route.backend_session_id == "backend-own-id"


def test_forged_or_foreign_session_ids_do_not_open() -> None:
    bal, other = _balancer(2), _balancer(2)
    sealed = bal.seal.seal("10.0.0.1:80", "sid")
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    for forged in (tampered, other.seal.seal("10.0.0.1:80", "sid"), "abc", "", "x" * 5000, "%%%"):
        assert bal.open_session(forged).refusal == "unknown"


def test_session_of_a_removed_backend_is_gone_and_of_an_ejected_one_is_kept() -> None:
    fake = clock_mod.FakeClock()
    bal = _balancer(3, clock=fake, consecutive_failures=1, base_ejection_s=10.0)
    a = bal.pool.backends["10.0.0.0:80"]
    sealed = bal.seal.seal(a.address, "sid")
    bal.sessions.bind(sealed, a, client="1.2.3.4")
    assert bal.outliers.failure(a, "connect")
    route = bal.open_session(sealed)
    assert route.refusal == "ejected" and route.retry_after_s == 10.0
    assert len(bal.sessions) == 1 and a.sessions == 1  # kept while ejected
    fake.advance(10.0)
    assert bal.open_session(sealed).refusal is None
    bal.pool.sync([BackendSpec(address="10.0.0.1:80")], source="inline")
    assert bal.open_session(sealed).refusal == "gone"
    assert len(bal.sessions) == 0 and a.sessions == 0


def test_session_keys_come_from_a_shared_file_and_rotate(tmp_path: Path) -> None:
    import base64

    old, new = (base64.b64encode(bytes([i]) * 32).decode() for i in (1, 2))
    path = tmp_path / "keys"
    path.write_text(old + "\n")
    first = sessions.SessionSeal.from_file(path)
    sealed_old = first.seal("10.0.0.1:80", "sid")
    path.write_text(f"{new}\n{old}\n")
    rotated = sessions.SessionSeal.from_file(path)
    assert rotated.open(sealed_old) == ("10.0.0.1:80", "sid")  # old ids still open
    assert first.open(rotated.seal("10.0.0.1:80", "x")) is None  # new ids use the new key
    path.write_text("not base64 of 32 bytes\n")
    with pytest.raises(ConfigError, match="line 1: expected base64 of 32"):
        sessions.SessionSeal.from_file(path)


def test_session_table_is_bounded_per_client_without_breaking_routing() -> None:
    bal = _balancer(1, max_sessions_per_client=3)
    backend = next(iter(bal.pool.backends.values()))
    ids = [bal.seal.seal(backend.address, f"s{i}") for i in range(10)]
    for sid in ids:
        bal.sessions.bind(sid, backend, client="10.9.9.9")
    bal.sessions.bind(bal.seal.seal(backend.address, "other"), backend, client="10.8.8.8")
    assert bal.sessions.counted("10.9.9.9") == 3 and len(bal.sessions) == 4 and backend.sessions == 4
    assert bal.open_session(ids[0]).backend is backend  # evicted from the count, still routable


def test_idle_sessions_expire() -> None:
    fake = clock_mod.FakeClock()
    bal = _balancer(1, clock=fake, session_idle_timeout_s=60.0)
    backend = next(iter(bal.pool.backends.values()))
    bal.sessions.bind("old", backend)
    fake.advance(30.0)
    bal.sessions.bind("new", backend)
    fake.advance(40.0)
    assert bal.sessions.expire() == 1
    assert len(bal.sessions) == 1 and backend.sessions == 1


def test_consistent_hashing_keeps_keys_and_moves_few_when_a_backend_joins() -> None:
    bal = _balancer(4, session_epsilon=10.0)
    keys = [f"user-{i}" for i in range(400)]
    before = {k: bal.choose(affinity_key=k) for k in keys}
    assert all(bal.choose(affinity_key=k) is before[k] for k in keys)
    bal.pool.sync([*(BackendSpec(address=f"10.0.0.{i}:80") for i in range(5))], source="inline", initial=True)
    after = {k: bal.choose(affinity_key=k) for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert all(after[k] is not None and after[k].address == "10.0.0.4:80" for k in moved)  # type: ignore[union-attr]
    assert 0 < len(moved) < 200


def test_affinity_overflows_a_hot_backend_under_the_bound() -> None:
    bal = _balancer(3, session_epsilon=0.25)
    home = bal.choose(affinity_key="tenant-a")
    assert home is not None
    home.active = 10
    elsewhere = bal.choose(affinity_key="tenant-a")
    assert elsewhere is not None and elsewhere is not home


def test_mcp_method_routes_only_to_backends_serving_it() -> None:
    bal = _balancer(1)
    bal.pool.sync(
        [BackendSpec(address="10.0.0.1:80", methods=("tools/call",)), BackendSpec(address="10.0.0.2:80")],
        source="inline",
        initial=True,
    )
    bal.pool.backends["10.0.0.2:80"].active = 5
    assert bal.choose(method="tools/call").address == "10.0.0.1:80"  # type: ignore[union-attr]
    assert bal.choose(method="resources/read").address == "10.0.0.2:80"  # type: ignore[union-attr]


def test_warm_up_ends_early_once_ttfb_settles() -> None:
    fake = clock_mod.FakeClock()
    bal = _balancer(1, clock=fake, slow_start_s=60.0, slow_start_min_samples=3)
    old = next(iter(bal.pool.backends.values()))
    old.observe_ttfb(0.2, fake.monotonic())
    bal.pool.sync([BackendSpec(address="10.0.0.0:80"), BackendSpec(address="10.0.0.9:80")], source="inline")
    new = bal.pool.backends["10.0.0.9:80"]
    assert new.state(fake.monotonic()) == "warming"
    for _ in range(3):
        new.observe_ttfb(2.0, fake.monotonic())
    bal.warmup.refresh()
    assert not new.warm  # slow compared with the others: keep ramping
    fake.advance(60.0)
    for _ in range(3):
        new.observe_ttfb(0.25, fake.monotonic())
    bal.warmup.refresh()
    assert new.warm


def test_hotspot_needs_the_factor_for_the_configured_time() -> None:
    fake = clock_mod.FakeClock()
    bal = _balancer(3, clock=fake, hotspot_factor=1.5, hotspot_for_s=30.0)
    tracker = reporting.HotspotTracker(bal)
    a, b, c = bal.pool.backends.values()
    a.active, b.active, c.active = 8, 2, 2
    assert tracker.update()[a.address] == reporting.Hotspot(score=2.0, hot=False, reason="")
    fake.advance(29.0)
    assert not tracker.update()[a.address].hot
    fake.advance(1.0)
    spot = tracker.update()[a.address]
    assert spot.hot and spot.reason.startswith("load 2.0x the weighted mean for 30s")
    a.active, a.sessions = 2, 6  # now mostly session-bound
    fake.advance(31.0)
    tracker.update()
    fake.advance(30.0)
    assert tracker.update()[a.address].reason.startswith("sticky sessions: 6 of 8")
    a.sessions = 0
    assert not tracker.update()[a.address].hot  # dropping below resets the timer


def test_hotspot_score_is_weighted() -> None:
    bal = _balancer(2)
    a, b = bal.pool.backends.values()
    a.weight, a.active, b.active = 3.0, 6, 2
    scores = reporting.HotspotTracker(bal).update()
    assert (scores[a.address].score, scores[b.address].score) == (1.0, 1.0)


def test_scraped_queue_and_stale_figures_count_as_saturated() -> None:
    text = (
        '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="a"} 3\n'
        'vllm:num_requests_waiting{model_name="b"} 2\n'
    )
    assert scraping.parse_waiting(text) == 5
    with pytest.raises(ValueError, match="not in the scraped metrics"):
        scraping.parse_waiting("# nothing\n")


def test_pick_skips_backends_at_their_stream_cap() -> None:
    bal = _balancer(2, max_streams_per_backend=2)
    a, b = bal.pool.backends.values()
    a.active, b.active = 2, 2
    assert bal.choose() is None
    b.weight = 2.0  # a weight-2 backend carries twice the cap
    assert bal.choose() is b
    assert {bal.choose() for _ in range(5)} == {b}
