"""The simulator's stream bookkeeping: exact FIFO queueing, placement by the balancer's picker, conservation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from emulation import streams as sim_streams
from tests.fakes import specs


def test_replay_gives_each_stream_the_earliest_free_slot_in_arrival_order() -> None:
    starts, rejected, done = sim_streams._replay(
        np.array([0.0, 0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0, 5.0]), [0.0, 0.0], t1=15.0, timeout_s=60.0
    )
    assert starts.tolist() == [0.0, 0.1, 1.0, 1.1]
    assert not rejected.any() and done == 4


def test_replay_rejects_streams_that_would_wait_past_the_timeout_and_keeps_the_rest_queued() -> None:
    starts, rejected, done = sim_streams._replay(
        np.array([0.0, 1.0, 2.0]), np.array([100.0, 1.0, 1.0]), [0.0], t1=15.0, timeout_s=60.0
    )
    # One slot, busy until t=100: nobody else can start within this tick; they stay queued.
    assert starts[0] == 0.0 and np.isnan(starts[1:]).all()
    assert done == 1 and not rejected.any()


def test_no_wait_sees_the_one_arrival_that_would_wait() -> None:
    tick = sim_streams.Tick.of(0.0, 15.0, np.array([0.0, 1.0, 8.0]), np.array([5.0, 5.0, 1.0]))
    assert not sim_streams.no_wait(tick, np.array([0.0, 6.0]))  # the 1.0 arrival finds no free slot
    assert sim_streams.no_wait(tick, np.array([0.0, 0.5]))
    assert sim_streams.no_wait(tick, np.array([0.0, 1.0]))  # a slot freed at the arrival instant is free


@pytest.mark.parametrize("seed", range(30))
def test_vectorised_no_wait_test_agrees_with_the_stream_by_stream_replay(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    arr = np.sort(rng.random(n) * 15.0)
    dur = rng.exponential(3.0, n) + 0.01
    supply = np.concatenate([np.zeros(int(rng.integers(0, 8))), rng.random(int(rng.integers(0, 20))) * 15.0])
    starts, _rejected, done = sim_streams._replay(arr, dur, np.sort(supply).tolist(), t1=15.0, timeout_s=60.0)
    replay_no_wait = done == n and bool(np.allclose(starts, arr))
    assert sim_streams.no_wait(sim_streams.Tick.of(0.0, 15.0, arr, dur), np.sort(supply)) == replay_no_wait


@pytest.mark.parametrize("seed", range(10))
def test_bulk_placement_matches_one_pick_per_stream(seed: int) -> None:
    """With a full scan (<= 8 pods), bulk water-filling ends where one pick per stream ends."""
    rng = random.Random(seed)
    pods = np.arange(10, 10 + rng.randint(2, 8), dtype=np.int64)
    load = np.array([rng.randint(0, 16) for _ in pods], dtype=np.int64)
    room = int((16 - load).sum())
    n = min(room, sim_streams.PICK_EACH_MAX + rng.randint(1, 40))
    bulk = sim_streams.place(n, pods, load, slots=16, rng=random.Random(1))
    each = sim_streams._place_each(n, pods, load, slots=16, rng=random.Random(1))
    final_bulk = load + np.bincount(bulk - 10, minlength=pods.size)
    final_each = load + np.bincount(each - 10, minlength=pods.size)
    assert bulk.size == each.size == n
    assert sorted(final_bulk.tolist()) == sorted(final_each.tolist())
    assert final_bulk.max() <= 16


def test_placement_never_overfills_a_pod_while_others_have_room() -> None:
    pods = np.arange(20, dtype=np.int64)
    load = np.array([15] * 10 + [0] * 10, dtype=np.int64)
    placed = sim_streams.place(100, pods, load, slots=16, rng=random.Random(0))
    final = load + np.bincount(placed, minlength=20)
    assert final.max() <= 16 and final.sum() == load.sum() + 100


def test_step_queues_when_slots_run_out_and_counts_every_stream() -> None:
    book = sim_streams.StreamBook(slo_s=2.0, rng=random.Random(0))
    arr = np.arange(0.0, 10.0, 0.5)  # 20 streams of 6 s on one pod with 4 slots
    dur = np.full(arr.size, 6.0)
    misses = book.step(
        sim_streams.Tick.of(0.0, 15.0, arr, dur), eligible=np.array([0], dtype=np.int64), slots=4, coming=()
    )
    assert book.started < 20 and book.q_arr.size > 0
    assert misses > 0 and book.met < book.started
    assert book.arrived == book.completed + book.rejected + book.cut + book.act_end.size + book.q_arr.size
    assert np.bincount(book.act_pod).max() <= 4


def test_removing_a_pod_cuts_its_streams_and_takes_them_out_of_the_slo() -> None:
    book = sim_streams.StreamBook(slo_s=2.0, rng=random.Random(0))
    arr = np.array([0.0, 0.1, 0.2, 0.3])
    book.step(
        sim_streams.Tick.of(0.0, 15.0, arr, np.full(4, 100.0)),
        eligible=np.array([0, 1], dtype=np.int64),
        slots=4,
        coming=(),
    )
    on_zero = int((book.act_pod == 0).sum())
    met = book.met
    assert book.remove_pods([0]) == on_zero
    assert book.cut == on_zero and book.met == met - on_zero
    assert (book.act_pod == 1).all()


def test_forward_max_is_what_must_be_billed_a_lead_time_ahead() -> None:
    x = np.array([0, 0, 0, 3, 0, 0, 1, 0], dtype=np.int64)
    assert sim_streams.forward_max(x, 2).tolist() == [0, 3, 3, 3, 1, 1, 1, 0]
    assert sim_streams.forward_max(x, 0).tolist() == x.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_oracle_peak_per_second_is_the_most_streams_open_at_any_instant(seed: int) -> None:
    """Checked by brute force: the open count changes only at an arrival or an end, so each second's peak is
    the count at its start or just after one of its arrivals."""
    rng = np.random.default_rng(seed)
    arr = np.sort(rng.random(300) * 60.0)
    dur = rng.exponential(4.0, arr.size) + 0.01
    spec = specs.spec(streams_per_replica=4)
    oracle = sim_streams.Oracle(spec, start_s=0.0, end_s=60.0)
    for t0 in range(0, 60, 15):
        inside = (arr >= t0) & (arr < t0 + 15)
        oracle.step(sim_streams.Tick.of(float(t0), float(t0 + 15), arr[inside], dur[inside]))
    ends = arr + dur

    def open_at(t: float) -> int:
        return int(np.sum((arr <= t) & (ends > t)))

    for sec in range(60):
        instants = [float(sec), *arr[(arr >= sec) & (arr < sec + 1)].tolist()]
        assert oracle.sec_max[sec] == max(open_at(t) for t in instants), sec
    assert oracle.replicas_per_s().tolist()[:60] == [-(-int(n) // 4) for n in oracle.sec_max[:60]]
