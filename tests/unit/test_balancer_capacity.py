"""Capacity learned from backend metrics (balancer/capacity.py): parsing the three servers' names, the
learning rule, probes and their back-off, and the learned limit acting as the stream cap."""

from __future__ import annotations

import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from balancer import capacity, relay
from balancer import config as config_mod
from balancer.runtime import Balancer
from contract import clock as clock_mod

VLLM = """# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a b}c"} 3.0
vllm:num_requests_running{model_name="d"} 2.0
vllm:num_requests_waiting{model_name="a b}c"} 1.0
vllm:num_requests_waiting{model_name="d"} 0.0 1700000000000
vllm:kv_cache_usage_perc{model_name="a b}c"} 0.5
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="d"} 0.0
"""
SGLANG = 'sglang:num_running_reqs{model_name="m"} 7\nsglang:num_queue_reqs{model_name="m"} 2\nsglang:token_usage{model_name="m"} 0.93\n'
TGI = "tgi_batch_current_size 4\ntgi_queue_size 0\n"


def test_parse_reads_vllm_sglang_and_tgi_figures_summed_over_labels() -> None:
    assert capacity.parse(VLLM) == capacity.LoadSample(running=5.0, waiting=1.0, kv_usage=0.5)
    assert capacity.parse(SGLANG) == capacity.LoadSample(running=7.0, waiting=2.0, kv_usage=0.93)
    assert capacity.parse(TGI) == capacity.LoadSample(running=4.0, waiting=0.0, kv_usage=None)
    old = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.25\n"
    assert capacity.parse(old) == capacity.LoadSample(running=1.0, waiting=0.0, kv_usage=0.25)
    assert capacity.parse("# nothing\nhttp_requests_total 5\n") is None
    assert capacity.parse("vllm:num_requests_running 1\n") is None  # no queue figure, no picture
    assert capacity.parse("vllm:num_requests_waiting 2\n") == capacity.LoadSample(running=None, waiting=2.0)


def _sample(running: float, waiting: float, kv: float | None = None) -> capacity.LoadSample:
    return capacity.LoadSample(running=running, waiting=waiting, kv_usage=kv)


def test_one_waiting_blip_teaches_nothing_and_a_backend_still_admitting_is_not_full() -> None:
    state = capacity.Learned()
    assert capacity.learn(state, _sample(3, 1), now_s=0.0, queue_waiting=False) is None  # one scrape: a blip
    assert capacity.learn(state, _sample(2, 0), now_s=2.0, queue_waiting=False) is None
    assert capacity.learn(state, _sample(3, 1), now_s=4.0, queue_waiting=False) is None
    assert capacity.learn(state, _sample(5, 2), now_s=6.0, queue_waiting=False) is None  # still growing
    assert capacity.learn(state, _sample(5, 3), now_s=8.0, queue_waiting=False) == 5  # queue, flat: full


def test_a_probe_raises_the_limit_by_one_and_backs_off_when_the_backend_queues_again() -> None:
    state = capacity.Learned()
    capacity.learn(state, _sample(8, 1), now_s=0.0, queue_waiting=False)
    assert capacity.learn(state, _sample(8, 1), now_s=1.0, queue_waiting=False) == 8
    # Held at 8 with streams waiting in the balancer; no probe before PROBE_AFTER_S, none without demand.
    assert capacity.learn(state, _sample(8, 0), now_s=10.0, queue_waiting=True) == 8
    assert capacity.learn(state, _sample(8, 0), now_s=40.0, queue_waiting=False) == 8
    assert capacity.learn(state, _sample(8, 0, kv=0.95), now_s=40.0, queue_waiting=True) == 8  # cache full
    assert capacity.learn(state, _sample(8, 0), now_s=40.0, queue_waiting=True) == 9  # the probe
    capacity.learn(state, _sample(8, 1), now_s=41.0, queue_waiting=True)
    assert capacity.learn(state, _sample(8, 1), now_s=42.0, queue_waiting=True) == 8  # it queued: back
    assert state.probe_wait_s == 2 * capacity.PROBE_AFTER_S
    assert capacity.learn(state, _sample(8, 0), now_s=42.0 + capacity.PROBE_AFTER_S, queue_waiting=True) == 8
    assert (
        capacity.learn(state, _sample(8, 0), now_s=42.0 + 2 * capacity.PROBE_AFTER_S, queue_waiting=True) == 9
    )


def test_a_backend_running_more_than_its_limit_without_a_queue_raises_it() -> None:
    state = capacity.Learned(limit=4, seen_full=True)
    assert capacity.learn(state, _sample(6, 0), now_s=0.0, queue_waiting=False) == 6


def test_before_any_queue_the_kv_cache_use_estimates_the_limit_and_a_queue_then_measures_it() -> None:
    state = capacity.Learned()
    assert capacity.learn(state, _sample(0, 0, kv=0.0), now_s=0.0, queue_waiting=False) is None  # idle
    assert capacity.learn(state, _sample(1, 0, kv=0.04), now_s=0.0, queue_waiting=False) == 25
    # A low use only raises the estimate: one sequence more or less moves it too much.
    assert capacity.learn(state, _sample(2, 0, kv=0.2), now_s=0.5, queue_waiting=False) == 25
    assert capacity.learn(state, _sample(5, 0, kv=5 / 16), now_s=1.0, queue_waiting=False) == 16
    assert capacity.learn(state, _sample(6, 0, kv=0.5), now_s=2.0, queue_waiting=False) == 12  # longer ones
    assert capacity.learn(state, _sample(12, 0, kv=0.4), now_s=2.5, queue_waiting=False) == 30  # shorter ones
    # It queues at 10 with its cache full: measured, and no longer estimated.
    assert capacity.learn(state, _sample(10, 2, kv=0.97), now_s=3.0, queue_waiting=False) == 10
    assert capacity.learn(state, _sample(4, 0, kv=0.3), now_s=4.0, queue_waiting=False) == 10


def test_scraping_is_on_by_default() -> None:
    config = config_mod.BalancerConfig.model_validate({"backends": [{"address": "10.0.0.1:80"}]})
    assert config.scrape_metrics is True


def test_learned_limit_caps_a_backend_only_when_no_cap_is_configured() -> None:
    config = config_mod.BalancerConfig.model_validate(
        {"backends": [{"address": "10.0.0.1:80"}, {"address": "10.0.0.2:80", "max_streams": 10}]}
    )
    bal = Balancer(config, clock=clock_mod.FakeClock())
    a, b = bal.pool.backends.values()
    a.learned.limit = b.learned.limit = 2
    a.active = b.active = 2
    assert a.capacity_streams(None) == 2 and b.capacity_streams(None) == 10
    assert bal.choose() is b  # a is full at its learned limit, b's configured cap wins over what was learned
    assert a.capacity_streams(3) == 3  # a configured default per weight wins too


EVENTS = [b"data: {%d}\n\n" % i for i in range(40)]


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    extension=st.booleans(),
    trailer=st.booleans(),
)
def test_the_chunked_end_is_found_exactly_however_the_body_is_split(
    sizes: list[int], cuts: list[int], extension: bool, trailer: bool
) -> None:
    """The relay's framing scan (relay.Pipe._scan) over arbitrary splits of a chunked body."""
    rng = random.Random(len(sizes))
    chunks = [bytes(rng.randrange(256) for _ in range(n)) for n in sizes]
    body = b"".join(b"%X%s\r\n%s\r\n" % (len(c), b";x=y" if extension else b"", c) for c in chunks)
    body += b"0\r\n" + (b"T: 1\r\n" if trailer else b"") + b"\r\n"
    stream = body + b"HTTP/1.1 200 OK\r\n"  # the next response must not be taken for this body
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    pipe = relay.Pipe.__new__(relay.Pipe)
    pipe.skip, pipe.carry, pipe.trailers = 0, b"", False
    offset = 0
    for start, stop in itertools.pairwise(points):
        end = pipe._scan(stream[start:stop])
        if end >= 0:
            offset = start + end
            break
    assert offset == len(body)
