"""`controller.kube.api.call`: Retry-After honoured on 429, long ones handed back as `Throttled`; the
client-side token bucket."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import exceptions as kube_exceptions

from controller import errors
from controller.kube import api


class Response:
    def __init__(self, status: int, headers: dict[str, str] | None = None, data: bytes = b"{}") -> None:
        self.status, self.reason, self.data = status, "x", data
        self.headers = headers or {}


class Script:
    """A client method answering the scripted responses in turn (raising ApiException for errors)."""

    def __init__(self, *responses: Response) -> None:
        self.responses = list(responses)
        self.calls = 0
        self.__name__ = "scripted"

    def __call__(self, *args: Any, **kwargs: Any) -> Response:
        self.calls += 1
        response = self.responses.pop(0)
        if response.status >= 400:
            raise kube_exceptions.ApiException(http_resp=response)
        return response


class Waits:
    def __init__(self) -> None:
        self.waited: list[float] = []

    def wait(self, seconds: float) -> bool:
        self.waited.append(seconds)
        return False


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Waits:
    recorder = Waits()
    monkeypatch.setattr(api, "_wait", recorder)
    return recorder


def test_a_short_retry_after_is_waited_out_then_the_call_succeeds(waits: Waits) -> None:
    fn = Script(Response(429, {"Retry-After": "3"}), Response(200, data=b'{"ok": true}'))
    assert api.call(fn) == {"ok": True}
    assert waits.waited == [3.0]  # not the 0.2 s of the first backoff step


def test_a_long_retry_after_is_raised_as_throttled_without_blocking(waits: Waits) -> None:
    fn = Script(Response(429, {"Retry-After": "60"}))
    with pytest.raises(errors.Throttled) as caught:
        api.call(fn)
    assert caught.value.retry_after_s == 60.0
    assert (fn.calls, waits.waited) == (1, [])


def test_a_503_is_retried_with_the_backoff_steps(waits: Waits) -> None:
    fn = Script(Response(503), Response(503), Response(200))
    assert api.call(fn) == {}
    assert waits.waited == list(api.RETRY_DELAYS_S[:2])


def test_token_bucket_allows_a_burst_then_paces_at_qps() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = api.TokenBucket(qps=10.0, burst=3, monotonic=lambda: now[0], sleep=sleep)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.1)
    assert bucket.take() == pytest.approx(0.1)
    now[0] += 10.0  # idle: the bucket refills up to the burst, no more
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.1)


def test_token_bucket_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="qps > 0 and burst >= 1"):
        api.TokenBucket(qps=0, burst=1)


def test_clients_do_not_let_urllib3_retry_behind_our_back() -> None:
    """Regression: urllib3 slept out a 429's Retry-After (60 s here) on the worker thread, uncounted."""
    client = api.client_for("http://127.0.0.1:1")
    assert client.configuration.retries is False
    client.close()
