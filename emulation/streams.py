"""The simulator's streams: arrivals per tick, an exact FIFO queue over stream slots, placement, the oracles.

Streams are kept as numpy arrays per policy (end time, pod, SLO met), never one Python object per stream, so
a week of millions of streams replays in about a minute. Within a tick the FIFO queue is exact: a vectorised
test shows when no stream waits (the common case); otherwise a heap of slot-free times replays the tick stream
by stream. New streams are placed on pods with the balancer's own `balancer.picking.pick`, one pick per
stream when a tick starts few, and in bulk with the same least-loaded rule when it starts many (water-filling,
which is where repeated picks end; a test checks they agree). A stream meets the SLO when it starts within
the target of arriving and is not cut; one that waits longer than `QUEUE_TIMEOUT_S` is rejected (the
balancer's admission queue answers 503).

The oracles serve every stream on arrival: `Oracle` records the most streams open in each second, from which
`emulation.simulate` bills `oracle` (each second's replicas) and `oracle-lead` (whole nodes, `forward_max`
over the lead time).

What this module does not do: decide capacity (`emulation.simulate`'s runners) or model pods and nodes
(`emulation.sim`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from balancer import picking
from controller import policy

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

QUEUE_TIMEOUT_S = 60.0
"""A stream still waiting this long is rejected (the balancer's admission queue gives up and answers 503)."""

_EMPTY: FloatArray = np.empty(0)

WAIT_EDGES_S = np.concatenate([[0.0], np.geomspace(1e-3, QUEUE_TIMEOUT_S + 1.0, 240)])
"""Histogram edges for waits to start; a histogram, not a list, keeps memory flat on week-long runs."""


@dataclass(frozen=True)
class Tick:
    """One reconcile interval's arrivals, with what every policy's fast path needs computed once."""

    t0: float
    t1: float
    arr: FloatArray
    """Arrival times, sorted."""
    dur: FloatArray
    ends: FloatArray
    """Arrival + duration: when each stream would end if it started on arrival."""
    need: IntArray
    """need[k]: slots that must be free at t0 or freed by running streams by arr[k] for streams 0..k to
    start on arrival (k + 1 minus the new streams already ended by then)."""
    need_max: int
    ends_sorted: FloatArray

    @classmethod
    def of(cls, t0: float, t1: float, arr: FloatArray, dur: FloatArray) -> Tick:
        ends = arr + dur
        ends_sorted = np.sort(ends)
        need = np.arange(1, arr.size + 1) - np.searchsorted(ends_sorted, arr, side="right")
        return cls(t0, t1, arr, dur, ends, need, int(need.max(initial=0)), ends_sorted)


# --- streams ----------------------------------------------------------------------------------------------------


@dataclass
class StreamBook:
    """The streams of one policy: running (arrays), waiting (FIFO arrays) and the counters."""

    slo_s: float
    rng: random.Random
    act_end: FloatArray = field(default_factory=lambda: np.empty(0))
    act_pod: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    act_met: npt.NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, dtype=bool))
    q_arr: FloatArray = field(default_factory=lambda: np.empty(0))
    q_dur: FloatArray = field(default_factory=lambda: np.empty(0))
    arrived: int = 0
    started: int = 0
    completed: int = 0
    rejected: int = 0
    cut: int = 0
    met: int = 0
    wait_hist: IntArray = field(default_factory=lambda: np.zeros(WAIT_EDGES_S.size, dtype=np.int64))
    """Counts of waits: index 0 is exactly zero, then one bin per pair of edges."""

    def per_pod(self, n_pods: int) -> IntArray:
        return np.bincount(self.act_pod, minlength=n_pods)

    def remove_pods(self, pod_ids: Sequence[int]) -> int:
        """Cut the streams still running on removed pods; returns how many."""
        if not pod_ids or self.act_pod.size == 0:
            return 0
        mask = np.isin(self.act_pod, np.asarray(pod_ids, dtype=np.int64))
        n = int(mask.sum())
        if n:
            self.cut += n
            self.met -= int(self.act_met[mask].sum())
            keep = ~mask
            self.act_end, self.act_pod, self.act_met = (
                self.act_end[keep],
                self.act_pod[keep],
                self.act_met[keep],
            )
        return n

    def step(
        self,
        tick: Tick,
        *,
        eligible: IntArray,
        slots: int | IntArray,
        coming: Sequence[tuple[int, float]],
    ) -> int:
        """Serve one tick's arrivals on pods `eligible` (ids, Ready and not draining at t0) and `coming` (id,
        ready time in the tick). Returns the SLO misses decided in it.

        `slots` is every pod's stream slots, or an array of them indexed by pod id (a mixed GPU pool)."""
        t0, t1, arr, dur = tick.t0, tick.t1, tick.arr, tick.dur
        self.arrived += arr.size
        coming_ids = np.array([p for p, _ in coming], dtype=np.int64)
        pods_t1 = np.concatenate([eligible, coming_ids]) if coming else eligible
        n_ids = max(int(self.act_pod.max(initial=-1)), int(pods_t1.max(initial=-1))) + 1
        is_elig = np.zeros(n_ids, dtype=bool)
        is_elig[pods_t1] = True
        live0 = np.bincount(self.act_pod, minlength=n_ids)
        per_pod = not isinstance(slots, int)
        if per_pod:
            slots_arr = np.asarray(slots, dtype=np.int64)
            if slots_arr.size < n_ids:  # pods the caller has not sized (none in practice) get the last size
                slots_arr = np.concatenate([slots_arr, np.full(n_ids - slots_arr.size, slots_arr[-1])])
            free0 = int(np.maximum(slots_arr[eligible] - live0[eligible], 0).sum())
        else:
            free0 = int(np.maximum(slots - live0[eligible], 0).sum())
        ending = self.act_end <= t1
        releases = self.act_end[ending & is_elig[self.act_pod]]
        queued_before = self.q_arr.size
        cust_a = np.concatenate([self.q_arr, arr]) if queued_before else arr
        cust_d = np.concatenate([self.q_dur, dur]) if queued_before else dur
        m = cust_a.size
        misses = 0
        fast = m == 0 or (queued_before == 0 and free0 >= tick.need_max)
        supply: FloatArray | None = None
        if not fast:
            parts = [np.full(free0, t0), releases]
            if coming:
                parts.append(
                    np.repeat(np.array([t for _, t in coming]), slots_arr[coming_ids] if per_pod else slots)
                )
            supply = np.concatenate(parts)
            supply.sort()
            if queued_before == 0:
                fast = no_wait(tick, supply)
        ends = tick.ends
        if fast:
            # Nobody waits: every stream starts on arrival.
            self.wait_hist[0] += m
            self.met += m
            starts = cust_a
            met_new: npt.NDArray[np.bool_] | None = None
            self.q_arr, self.q_dur = _EMPTY, _EMPTY
            self.started += m
        else:
            assert supply is not None
            starts, rejected, n_done = _replay(
                cust_a, cust_d, supply.tolist(), t1=t1, timeout_s=QUEUE_TIMEOUT_S
            )
            ok = ~np.isnan(starts)
            rest_a, rest_d = cust_a[n_done:], cust_d[n_done:]
            late = rest_a + QUEUE_TIMEOUT_S <= t1  # still waiting, past the admission timeout: rejected
            rejected_n = int(rejected.sum()) + int(late.sum())
            self.rejected += rejected_n
            self.q_arr, self.q_dur = rest_a[~late], rest_d[~late]
            waits = (starts - cust_a)[ok]
            met_ok = waits <= self.slo_s + 1e-9
            self.met += int(met_ok.sum())
            zero = waits <= 0.0
            self.wait_hist[0] += int(zero.sum())
            if not zero.all():
                idx = np.searchsorted(WAIT_EDGES_S, waits[~zero], side="left")
                self.wait_hist += np.bincount(
                    np.minimum(idx, WAIT_EDGES_S.size - 1), minlength=WAIT_EDGES_S.size
                )
            misses = int((~met_ok).sum()) + rejected_n
            starts, cust_d, met_new = starts[ok], cust_d[ok], met_ok
            self.started += int(ok.sum())
            ends = starts + cust_d

        # Streams that ended by t1 leave; those still running at t1 are placed on pods.
        n_end_old = int(ending.sum())
        if n_end_old:
            keep = ~ending
            self.act_end, self.act_pod, self.act_met = (
                self.act_end[keep],
                self.act_pod[keep],
                self.act_met[keep],
            )
        live = ends > t1
        n_live = int(live.sum())
        self.completed += n_end_old + ends.size - n_live
        if n_live:
            load = np.bincount(self.act_pod, minlength=n_ids)[pods_t1]
            if per_pod:
                placed = place_weighted(n_live, pods_t1, load, slots=slots_arr[pods_t1], rng=self.rng)
            else:
                placed = place(n_live, pods_t1, load, slots=int(slots), rng=self.rng)
            self.act_end = np.concatenate([self.act_end, ends[live]])
            self.act_pod = np.concatenate([self.act_pod, placed])
            new_met = np.ones(n_live, dtype=bool) if met_new is None else met_new[live]
            self.act_met = np.concatenate([self.act_met, new_met])
        return misses

    def wait_quantile(self, q: float) -> float:
        """Wait to start at quantile q of started streams, from the histogram (upper bin edge)."""
        total = int(self.wait_hist.sum())
        if total == 0:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.wait_hist), q * total, side="left"))
        return float(WAIT_EDGES_S[min(k, WAIT_EDGES_S.size - 1)])


def no_wait(tick: Tick, supply: FloatArray) -> bool:
    """Whether, with no stream queued before it, every arrival of `tick` starts on arrival.

    `supply` is the sorted times slots become free (at t0, as running streams end, as pods turn Ready). The
    k-th arrival starts on arrival exactly when the slots free by then cover `tick.need[k]`; this vectorised
    test replaces a stream-by-stream replay in the common case (a test checks the two agree).
    """
    return bool((np.searchsorted(supply, tick.arr, side="right") >= tick.need).all())


def _replay(
    cust_a: FloatArray, cust_d: FloatArray, heap: list[float], *, t1: float, timeout_s: float
) -> tuple[FloatArray, npt.NDArray[np.bool_], int]:
    """FIFO multi-slot queue for one tick, stream by stream: each takes the earliest free slot.

    Returns start times (NaN when not started), the rejected mask, and how many customers were decided
    (started or rejected); the rest are still waiting at t1."""
    m = cust_a.size
    starts = np.full(m, np.nan)
    rejected = np.zeros(m, dtype=bool)
    a_list, d_list = cust_a.tolist(), cust_d.tolist()
    k = 0
    while k < m:
        if not heap or heap[0] >= t1:
            break
        a = a_list[k]
        s = heap[0] if heap[0] > a else a
        if s - a > timeout_s:
            rejected[k] = True
            k += 1
            continue
        e = s + d_list[k]
        if e < t1:
            heapq.heapreplace(heap, e)
        else:
            heapq.heappop(heap)
        starts[k] = s
        k += 1
    return starts, rejected, k


PICK_EACH_MAX = 64
"""Up to this many new streams in a tick are placed one `picking.pick` call each; above it, in bulk."""


def place(n: int, pods: IntArray, load: IntArray, *, slots: int, rng: random.Random) -> IntArray:
    """Place `n` new streams on `pods` (open streams `load` each, `slots` at most) as the balancer would.

    Few streams: one `balancer.picking.pick` per stream over the pods with a free slot, each pick seeing the
    previous ones. Many streams (a busy tick at full scale): the same least-loaded rule applied in bulk,
    which is what repeated picks converge to: the least loaded pods are filled up to a common level
    (water-filling), and the streams left over go one each to pods at that level, in random order (the
    picker's tie-break among equals). `tests/unit/test_sim_engine.py` checks the two agree."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if pods.size == 0:
        return np.full(n, -1, dtype=np.int64)
    if n <= PICK_EACH_MAX:
        return _place_each(n, pods, load, slots=slots, rng=rng)
    load = load.astype(np.int64)
    room = np.maximum(slots - load, 0)
    if int(room.sum()) <= n:
        take = room.copy()
        take[int(np.argmin(load))] += n - int(room.sum())  # more streams than slots: the least loaded waits
        return np.repeat(pods, take)
    levels = np.arange(int(load.min()), slots + 1)
    fill = np.minimum(np.maximum(levels[:, None] - load[None, :], 0), room[None, :]).sum(axis=1)
    lo = int(levels[int(np.searchsorted(fill, n, side="right")) - 1])  # highest level filling <= n
    take = np.minimum(np.maximum(lo - load, 0), room)
    left = n - int(take.sum())
    if left:
        at_level = np.flatnonzero((load + take == lo) & (take < room))
        first = rng.randrange(at_level.size)  # the picker's random tie-break among equals
        take[at_level[(first + np.arange(left)) % at_level.size]] += 1
    return np.repeat(pods, take)


def place_weighted(
    n: int, pods: IntArray, load: IntArray, *, slots: IntArray, rng: random.Random
) -> IntArray:
    """`place` for pods of different sizes (a mixed GPU pool): each stream goes to the pod whose next slot is
    the least full relative to its own slots, which is the balancer's least-loaded rule with capacity weights
    (load / weight). Exact water-filling: every free slot is a candidate at level (load + k) / slots, the `n`
    lowest are taken, ties in random order (the picker's tie-break); more streams than free slots go to the
    least loaded pod, as in `place`."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if pods.size == 0:
        return np.full(n, -1, dtype=np.int64)
    load = load.astype(np.int64)
    room = np.maximum(slots - load, 0)
    total = int(room.sum())
    owner = np.repeat(np.arange(pods.size), room)
    k = np.arange(total) - np.repeat(np.cumsum(room) - room, room) + 1
    level = (load[owner] + k) / slots[owner]
    tie = (
        np.array([rng.random() for _ in range(total)])
        if total <= 4096
        else np.random.default_rng(rng.getrandbits(32)).random(total)
    )
    order = np.lexsort((tie, level))[:n]
    take = np.bincount(owner[order], minlength=pods.size)
    if n > total:
        take[int(np.argmin(load / np.maximum(slots, 1)))] += n - total
    return np.repeat(pods, take)


def _place_each(n: int, pods: IntArray, load: IntArray, *, slots: int, rng: random.Random) -> IntArray:
    loads = load.tolist()
    cands = [picking.Candidate(key=str(i), active=loads[i]) for i in range(pods.size) if loads[i] < slots]
    out = np.empty(n, dtype=np.int64)
    for k in range(n):
        if not cands:
            i = int(np.argmin(loads))
        else:
            c = picking.pick(cands, rng=rng)
            assert c is not None
            i = int(c.key)
            j = next(j for j, x in enumerate(cands) if x is c)
            if loads[i] + 1 < slots:
                cands[j] = picking.Candidate(key=c.key, active=loads[i] + 1)
            else:
                cands[j] = cands[-1]
                cands.pop()
        loads[i] += 1
        out[k] = pods[i]
    return out


class Oracle:
    """Demand served on arrival, per second: the most streams open at any instant of each second.

    `oracle` holds exactly the replicas each second's peak needs; `oracle-lead` derives from the same series.
    """

    def __init__(self, spec: policy.ScalingPolicySpec, *, start_s: float, end_s: float) -> None:
        self.slots = spec.capacity.streams_per_replica
        self.gpr = spec.capacity.gpus_per_replica
        self.start_s = start_s
        self.ends: FloatArray = np.empty(0)
        """End times of the streams running, sorted."""
        self.sec_max = np.zeros(math.ceil(end_s - start_s) + 1, dtype=np.int64)

    def step(self, tick: Tick) -> None:
        old = self.ends
        arr = tick.arr
        s0 = math.floor(tick.t0 - self.start_s)
        s1 = min(math.ceil(tick.t1 - self.start_s), self.sec_max.size)
        sec = self.start_s + np.arange(s0, s1, dtype=np.float64)
        # Open streams at each second's start, and just after each arrival.
        new_ends = tick.ends_sorted
        first = np.searchsorted(arr, sec, side="left")
        at_sec = (
            first
            - np.searchsorted(new_ends, sec, side="right")
            + (old.size - np.searchsorted(old, sec, side="right"))
        )
        peak = at_sec
        if arr.size:
            at_arr = tick.need + (old.size - np.searchsorted(old, arr, side="right"))
            has = np.diff(np.append(first, arr.size)) > 0
            if has.any():
                red = np.maximum.reduceat(at_arr, np.minimum(first, arr.size - 1))
                peak = np.where(has, np.maximum(at_sec, red), at_sec)
        np.maximum(self.sec_max[s0:s1], peak, out=self.sec_max[s0:s1])
        keep = np.concatenate([old[old > tick.t1], new_ends[new_ends > tick.t1]])
        keep.sort()
        self.ends = keep

    @property
    def gpu_s(self) -> float:
        return float(self.replicas_per_s().sum()) * self.gpr

    def replicas_per_s(self) -> IntArray:
        return np.ceil(self.sec_max / self.slots).astype(np.int64)


def forward_max(x: IntArray, window: int) -> IntArray:
    """out[i] = max(x[i : i + window + 1]): what must be billed now to have x ready `window` steps later."""
    if window <= 0 or x.size == 0:
        return x.copy()
    w = window + 1
    n = x.size
    pad = (-n) % w
    y = np.concatenate([x, np.full(pad + w, x.min(initial=0))]).reshape(-1, w)
    prefix = np.maximum.accumulate(y, axis=1).ravel()
    suffix = np.maximum.accumulate(y[:, ::-1], axis=1)[:, ::-1].ravel()
    i = np.arange(n)
    return np.maximum(suffix[i], prefix[i + w - 1])
