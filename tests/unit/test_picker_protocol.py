"""The picker's protocol pieces without a gateway: subset hints, the pick message, error answers, pool mapping."""

from __future__ import annotations

import json
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from balancer import extproc, inferencepools
from contract import clock as clock_mod


def _metadata(namespace: str, fields: dict[str, Any]) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    value = struct_pb2.Struct()
    value.update(fields)
    metadata.filter_metadata[namespace].CopyFrom(value)
    return metadata


def test_subset_hint_accepts_a_list_or_comma_separated_strings_and_absent_means_no_limit() -> None:
    listed = _metadata(extproc.SUBSET_NAMESPACE, {extproc.SUBSET: ["10.0.0.1:8000", "10.0.0.2:8000"]})
    assert extproc._subset(listed) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    joined = _metadata(extproc.SUBSET_NAMESPACE, {extproc.SUBSET: "10.0.0.1:8000, 10.0.0.3:8000"})
    assert extproc._subset(joined) == {"10.0.0.1:8000", "10.0.0.3:8000"}
    empty = _metadata(extproc.SUBSET_NAMESPACE, {extproc.SUBSET: []})
    assert extproc._subset(empty) == frozenset()  # present but empty: nothing may be picked (503)
    assert extproc._subset(base_pb2.Metadata()) is None
    assert extproc._subset(_metadata(extproc.SUBSET_NAMESPACE, {"other": "x"})) is None


def test_pick_names_the_same_endpoints_in_header_and_metadata_primary_first() -> None:
    answer = extproc._routed(("10.0.0.2:8000", "10.0.0.1:8000"), phase="request_headers")
    common = answer.request_headers.response
    assert common.clear_route_cache
    (header,) = common.header_mutation.set_headers
    assert header.header.key == extproc.DESTINATION
    assert header.header.raw_value == b"10.0.0.2:8000,10.0.0.1:8000"
    lb = answer.dynamic_metadata.fields[extproc.LB_NAMESPACE].struct_value
    assert lb.fields[extproc.DESTINATION].string_value == "10.0.0.2:8000,10.0.0.1:8000"
    in_body = extproc._routed(("10.0.0.2:8000",), phase="request_body")
    assert in_body.HasField("request_body") and in_body.request_body.response.clear_route_cache


def test_error_answers_carry_the_balancer_json_body_and_retry_after() -> None:
    answer = extproc._immediate(503, "every backend is full", retry_after=True).immediate_response
    assert answer.status.code == 503
    assert json.loads(answer.body) == {
        "error": {"code": 503, "message": "every backend is full", "type": "balancer_error"}
    }
    headers = {h.header.key: h.header.raw_value for h in answer.headers.set_headers}
    assert headers == {
        "content-type": b"application/json",
        "retry-after": str(extproc.RETRY_AFTER_S).encode(),
    }


def test_served_endpoint_is_read_from_the_lb_metadata() -> None:
    metadata = _metadata(extproc.LB_NAMESPACE, {extproc.SERVED: "10.0.0.7:8000"})
    assert extproc._metadata_value(metadata, extproc.LB_NAMESPACE, extproc.SERVED) == "10.0.0.7:8000"
    assert extproc._metadata_value(base_pb2.Metadata(), extproc.LB_NAMESPACE, extproc.SERVED) is None


def test_inferencepool_without_selector_or_port_has_no_backends() -> None:
    clock = clock_mod.FakeClock()
    pod = {
        "metadata": {"name": "w", "labels": {"app": "x"}},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    broken = {
        "metadata": {"name": "p"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": []},
    }
    assert inferencepools.pool_backends(broken, [pod], clock=clock) == ([], {})
    assert inferencepools.pool_backends(None, [pod], clock=clock) == ([], {})
    pool = {
        "metadata": {"name": "p"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 80}]},
    }
    ipv6 = {**pod, "status": {**pod["status"], "podIP": "fd00::1"}}
    specs, _ = inferencepools.pool_backends(pool, [pod, ipv6], clock=clock)
    assert [s.address for s in specs] == ["10.0.0.1:80", "[fd00::1]:80"]
