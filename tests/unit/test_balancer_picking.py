"""picking.pick: least normalised load, never draining/ejected, TTFB breaks ties, power of two above a few."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from balancer.picking import FULL_SCAN_MAX, Candidate, pick


def test_least_loaded_wins_with_capacity_weights() -> None:
    small = Candidate("a", active=2, weight=1.0)
    big = Candidate("b", active=3, weight=2.0)
    assert pick([small, big], rng=random.Random(0)) == big


def test_queued_streams_count_as_load() -> None:
    a = Candidate("a", active=1, queued=5)
    b = Candidate("b", active=3)
    assert pick([a, b], rng=random.Random(0)) == b


def test_draining_and_ejected_are_never_picked() -> None:
    cands = [
        Candidate("a", active=9),
        Candidate("b", 0, state="draining"),
        Candidate("c", 0, state="ejected"),
    ]
    assert pick(cands, rng=random.Random(0)) == cands[0]
    assert pick(cands[1:], rng=random.Random(0)) is None
    assert pick([], rng=random.Random(0)) is None


def test_ttfb_breaks_ties() -> None:
    slow = Candidate("slow", active=1, ttfb_ewma_s=2.0)
    fast = Candidate("fast", active=1, ttfb_ewma_s=0.1)
    assert pick([slow, fast], rng=random.Random(0)) == fast


def test_warming_backend_counts_as_smaller() -> None:
    warming = Candidate("w", active=1, state="warming", warm_factor=0.25)
    warm = Candidate("r", active=3)
    assert warming.load == 4.0
    assert pick([warming, warm], rng=random.Random(0)) == warm
    # A warming backend with zero streams still gets work: load 0 is least.
    assert pick([Candidate("w", 0, state="warming", warm_factor=0.0), warm], rng=random.Random(0)).key == "w"


def test_power_of_two_above_full_scan_never_picks_the_most_loaded() -> None:
    cands = [Candidate(str(i), active=i) for i in range(FULL_SCAN_MAX + 5)]
    rng = random.Random(7)
    picked = [pick(cands, rng=rng) for _ in range(500)]
    keys = {c.key for c in picked if c is not None}
    assert str(FULL_SCAN_MAX + 4) not in keys  # the most loaded loses every pair it is in
    assert len(keys) > 3  # sampling spreads picks instead of a herd onto one


candidates = st.lists(
    st.builds(
        Candidate,
        key=st.text(min_size=1, max_size=3),
        active=st.integers(0, 50),
        queued=st.integers(0, 5),
        weight=st.floats(0.1, 8.0),
        ttfb_ewma_s=st.floats(0, 5),
        state=st.sampled_from(["warming", "ready", "draining", "ejected"]),
        warm_factor=st.floats(0.0, 1.0),
    ),
    max_size=FULL_SCAN_MAX,
)


@given(candidates)
def test_full_scan_returns_an_eligible_minimum(cands: list[Candidate]) -> None:
    chosen = pick(cands, rng=random.Random(1))
    eligible = [c for c in cands if c.state in ("ready", "warming")]
    if not eligible:
        assert chosen is None
        return
    assert chosen is not None and chosen.state in ("ready", "warming")
    assert chosen.load == min(c.load for c in eligible)
