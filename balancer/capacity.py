"""Capacity learned, not only told: how many streams a backend runs at once, from what it publishes.

A GPU inference server runs a bounded batch (vLLM `max_num_seqs`, or fewer when the KV cache is full) and queues
the rest inside the pod, where a stream waits for that pod's next free slot even when another pod has one. If
the balancer knows the batch size it caps each backend there (`Backend.capacity_streams`), and the excess waits
in the balancer's admission queue for the first free slot anywhere. Operators rarely know each pod's limit in a
mixed pool, but the pods publish their load on `/metrics`:

| server | running                      | waiting                      | KV cache in use (0..1)                              |
|--------|------------------------------|------------------------------|-----------------------------------------------------|
| vLLM   | `vllm:num_requests_running`  | `vllm:num_requests_waiting`  | `vllm:kv_cache_usage_perc` (`gpu_cache_usage_perc` before V1) |
| SGLang | `sglang:num_running_reqs`    | `sglang:num_queue_reqs`      | `sglang:token_usage`                                |
| TGI    | `tgi_batch_current_size`     | `tgi_queue_size`             | (none)                                              |

The rule (`learn`): a backend that reports waiting requests in two scrapes in a row, with its running count not
growing between them, runs as many as it can: its limit is that running count. Two scrapes, because a request
sits in vLLM's waiting queue for a scheduler step even when there is room (one sample with `waiting=1` is not
a full batch); not growing, because a backend still admitting is not at its limit. One scrape is enough when
its KV cache is full too (`KV_FULL`): then nothing waiting can be admitted. Learning fast matters: a stream
placed in a full pod stays in that pod's queue even after the limit is known, so before any queue has been
seen the limit is estimated from the KV cache: a backend running `r` sequences with a fraction `u` of its cache
in use holds about `r / u` sequences like them (vLLM and SGLang admit while cache blocks are free). The estimate
follows every scrape until a queue gives the measured limit, which then only probes can raise. The limit can also rise: a
backend held at its learned limit while streams wait in the balancer, with no queue of its own and its KV cache
below `KV_PROBE_MAX`, is given one stream more (a probe) after `PROBE_AFTER_S`; a probe that makes it queue
sets the limit back and doubles the wait before the next one (up to `PROBE_MAX_S`), so a limit that is right
costs one stream waiting in a pod every few minutes.

What this module does not do: I/O (scraping.py fetches), or override a limit the operator configured
(`max_streams`, `max_streams_per_backend` win). With several balancer replicas each caps its own streams at the
learned limit; the backend's reported queue (`Backend.queued`) still steers picking across replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

SERVERS: Final = (
    (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    ("sglang:num_running_reqs", "sglang:num_queue_reqs", ("sglang:token_usage",)),
    ("tgi_batch_current_size", "tgi_queue_size", ()),
)
"""(running, waiting, KV-cache usage names) per server family; the first family found in a scrape is used."""

_WANTED: Final = frozenset(name for running, waiting, kv in SERVERS for name in (running, waiting, *kv))

KV_FULL: Final = 0.95
"""KV-cache use at which a queue proves the backend full in one scrape (no room is left to admit the waiting)."""
KV_ESTIMATE_MIN: Final = 0.25
"""Least KV-cache use from which `running / use` may lower the estimated limit: below it one sequence more or
less moves the estimate too much, so it may only raise it (a cap that is too high costs nothing new)."""
KV_PROBE_MAX: Final = 0.9
"""No probe above this KV-cache usage: the cache, not the batch size, is what limits the backend then."""
PROBE_AFTER_S: Final = 30.0
"""First wait before offering one stream more than the learned limit: long enough that probes are rare."""
PROBE_MAX_S: Final = 300.0
"""Longest wait between probes once the limit was confirmed again and again."""


@dataclass(frozen=True)
class LoadSample:
    """What a backend reports about its own load at one scrape."""

    running: float | None
    """Requests it runs now; None when the server publishes only its queue (then nothing is learned)."""
    waiting: float
    kv_usage: float | None = None
    """KV-cache in use, 0..1; None when the server does not publish it."""


@dataclass
class Learned:
    """What has been learned about one backend's limit so far (kept on `Backend.learned`)."""

    limit: int | None = None
    """Streams it runs at once; None until it was seen saturated."""
    last: LoadSample | None = None
    """The previous sample (saturation must show in two in a row)."""
    changed_s: float = 0.0
    """When `limit` last changed or was confirmed (probes wait from here)."""
    probe_wait_s: float = PROBE_AFTER_S
    probing: bool = False
    """True while a probe (limit + 1) is out."""
    seen_full: bool = False
    """True once the limit came from the backend queueing (until then it is the KV-cache estimate)."""


def parse(text: str) -> LoadSample | None:
    """The load figures in a Prometheus text exposition, summed over label sets; None when none is there.

    Only the wanted sample lines are looked at (a vLLM scrape is mostly histograms), so a scrape costs a pass
    over the lines and no full parse.
    """
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        end = brace if 0 <= brace < space or (brace >= 0 and space < 0) else space
        if end <= 0 or line[:end] not in _WANTED:
            continue
        rest = line[line.rfind("}") + 1 :] if brace == end else line[end:]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if value != value:  # NaN: no figure
            continue
        name = line[:end]
        totals[name] = totals.get(name, 0.0) + value
    for running, waiting, kv_names in SERVERS:
        if waiting in totals:
            kv = next((totals[k] for k in kv_names if k in totals), None)
            return LoadSample(running=totals.get(running), waiting=totals[waiting], kv_usage=kv)
    return None


def learn(state: Learned, sample: LoadSample, *, now_s: float, queue_waiting: bool) -> int | None:
    """Fold one scrape into `state`; returns the limit (None while unknown).

    Args:
        state: this backend's learning state, updated in place.
        sample: what it reported now.
        now_s: monotonic time of the scrape.
        queue_waiting: streams are waiting in the balancer's admission queue (a probe would serve one).
    """
    if sample.running is None:
        return state.limit
    last, state.last = state.last, sample
    running = round(sample.running)
    full_cache = sample.kv_usage is not None and sample.kv_usage >= KV_FULL
    saturated = (
        sample.waiting >= 1
        and running >= 1
        and (
            full_cache
            or (
                last is not None
                and last.running is not None
                and last.waiting >= 1
                and running <= round(last.running)
            )
        )
    )
    if saturated:
        if state.probing:  # the probe made it queue: back, and wait longer before the next one
            state.probe_wait_s = min(state.probe_wait_s * 2, PROBE_MAX_S)
        state.limit, state.changed_s, state.probing, state.seen_full = running, now_s, False, True
        return running
    if not state.seen_full:
        kv = sample.kv_usage
        if kv is not None and kv > 0 and running >= 1 and sample.waiting < 1:
            estimate = max(running, math.floor(running / kv + 1e-6))  # what the cache would hold
            if kv >= KV_ESTIMATE_MIN or state.limit is None or estimate > state.limit:
                state.limit = estimate  # a low use only ever raises it: one sequence moves it too much
                state.changed_s = now_s
        return state.limit
    limit = state.limit
    if limit is None:
        return None
    if sample.waiting < 1 and running > limit:  # it runs more than we thought, without a queue
        state.limit, state.changed_s, state.probing = running, now_s, False
        return running
    if state.probing:
        if now_s - state.changed_s >= state.probe_wait_s:
            state.probing = False  # the probe went through without a queue: the new limit holds
        return limit
    kv_ok = sample.kv_usage is None or sample.kv_usage < KV_PROBE_MAX
    if queue_waiting and sample.waiting < 1 and running >= limit and kv_ok:
        if now_s - state.changed_s >= state.probe_wait_s:
            state.limit, state.changed_s, state.probing = limit + 1, now_s, True
    return state.limit
