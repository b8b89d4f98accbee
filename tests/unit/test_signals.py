"""The balancer -> controller signals schema: round trip, strictness, and merging replicas."""

from __future__ import annotations

import pydantic
import pytest

from contract import signals


def _backend(address: str, **kw: object) -> signals.BackendSignals:
    base: dict[str, object] = {"address": address, "state": "ready", "active_streams": 0}
    base.update(kw)
    return signals.BackendSignals.model_validate(base)


def test_round_trip_json() -> None:
    report = signals.Signals(
        replica="balancer-0",
        time=1_700_000_000.0,
        backends=[_backend("10.0.0.1:8000", pod="w-1", active_streams=3, open_sessions=2, ttfb_s=0.2)],
        admission_queue=4,
        rejected_streams_total=1,
    )
    again = signals.Signals.model_validate_json(report.model_dump_json())
    assert again == report
    assert again.active_streams == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"replica": "r", "time": 1, "schema_version": 2},
        {"replica": "r", "time": 1, "extra": True},
        {"replica": "", "time": 1},
        {"replica": "r", "time": 1, "backends": [{"address": "a", "state": "sleeping", "active_streams": 0}]},
        {"replica": "r", "time": 1, "backends": [{"address": "a", "state": "ready", "active_streams": -1}]},
    ],
)
def test_rejects_what_a_reader_would_misread(bad: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        signals.Signals.model_validate(bad)


def test_merge_sums_streams_and_keeps_the_most_restrictive_state() -> None:
    one = signals.Signals(
        replica="a", time=1, backends=[_backend("x", active_streams=2, open_sessions=1, ttfb_s=0.1)]
    )
    two = signals.Signals(
        replica="b",
        time=1,
        backends=[
            _backend("x", state="draining", active_streams=5, ttfb_s=0.4),
            _backend("y", active_streams=1),
        ],
    )
    merged = signals.merge([one, two])
    assert merged["x"].active_streams == 7
    assert merged["x"].open_sessions == 1
    assert merged["x"].state == "draining"
    assert merged["x"].ttfb_s == 0.4
    assert merged["y"].active_streams == 1
