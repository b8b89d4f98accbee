"""Demand input that must not crash or overreach: Prometheus answers of an unexpected shape are missing data,
and the Prometheus URL a policy names is checked against the controller's allowlist."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controller import policy
from controller.demand import prometheus, registry

T0 = 1_700_000_040.0


class Answer:
    """A stand-in for `PrometheusConnect` answering every range query with `result`."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def custom_query_range(self, *args: Any, **kwargs: Any) -> Any:
        return self.result

    def close(self) -> None:
        pass


ODD_ANSWERS = {
    "an instant vector": [{"metric": {}, "value": [T0, "3"]}],
    "a non-numeric value": [{"metric": {}, "values": [[T0, "three"]]}],
    "a one-element pair": [{"metric": {}, "values": [[T0]]}],
    "a series that is not an object": ["3"],
    "a result that is not a list": {"resultType": "matrix"},
    "values that are not a list": [{"metric": {}, "values": "3"}],
}


@pytest.mark.parametrize("answer", list(ODD_ANSWERS.values()), ids=list(ODD_ANSWERS))
def test_an_answer_of_unexpected_shape_is_missing_data_not_an_exception(answer: Any) -> None:
    history = prometheus.PrometheusHistory("http://prom:9090", "sum(x)", step_s=60.0, history_s=600.0)
    history._client = Answer(answer)  # type: ignore[assignment]
    reading = history.read(T0)
    assert reading.history is None
    assert reading.error is not None and "unexpected" in reading.error


def test_a_well_formed_answer_still_reads() -> None:
    history = prometheus.PrometheusHistory("http://prom:9090", "sum(x)", step_s=60.0, history_s=600.0)
    history._client = Answer([{"metric": {}, "values": [[T0 - 60, "4"], [T0, "5"]]}])  # type: ignore[assignment]
    reading = history.read(T0)
    assert reading.error is None and reading.history is not None
    assert reading.history.values[-2:].tolist() == [4.0, 5.0]


ALLOWED = ["http://prometheus-operated.monitoring.svc:9090", "https://thanos.example.com/api/tenant-a"]


@pytest.mark.parametrize(
    "url",
    [
        "http://prometheus-operated.monitoring.svc:9090",
        "http://prometheus-operated.monitoring.svc:9090/",
        "https://thanos.example.com/api/tenant-a",
        "https://thanos.example.com:443/api/tenant-a/sub",
    ],
)
def test_allowed_prometheus_urls(url: str) -> None:
    assert registry.url_refusal(url, ALLOWED) is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://169.254.169.254/latest/meta-data", "not allowed"),
        ("http://prometheus-operated.monitoring.svc:9091", "not allowed"),
        ("https://thanos.example.com/api/tenant-ab", "not allowed"),
        ("http://thanos.example.com/api/tenant-a", "not allowed"),
        ("file:///etc/passwd", "http or https"),
        ("gopher://x", "http or https"),
        ("http://admin:hunter2@prometheus-operated.monitoring.svc:9090", "credentials"),
    ],
)
def test_refused_prometheus_urls_say_why_without_echoing_secrets(url: str, words: str) -> None:
    refusal = registry.url_refusal(url, ALLOWED)
    assert refusal is not None and words in refusal
    assert "hunter2" not in refusal


def test_without_an_allowlist_only_the_scheme_is_checked() -> None:
    assert registry.url_refusal("http://10.0.0.1:9090", None) is None
    assert registry.url_refusal("ftp://10.0.0.1", None) is not None


def test_a_refused_url_is_never_fetched_and_reads_as_missing_history() -> None:
    spec = policy.ScalingPolicySpec.model_validate(
        {
            "scaleTargetRef": {"kind": "Deployment", "name": "w"},
            "demand": {"prometheus": {"url": "http://10.0.0.1:9090", "query": "sum(x)"}},
            "capacity": {"streamsPerReplica": 4},
            "replicas": {"max": 3},
        }
    )
    pd = registry.PolicyDemand(spec, allowed_prometheus_urls=ALLOWED)
    assert pd.prometheus_ is None
    reading = asyncio.run(pd.read(T0))
    assert reading.history is None
    assert any("not allowed" in e for e in reading.errors)
