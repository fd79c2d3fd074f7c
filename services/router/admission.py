"""Router admission (pure): how many queued requests may leave the router's waiting queue now.

A request leaves the queue (first come, first served; replays of requests that lost their
backend first) only when there is room for it downstream: a prefill with a free slot and a
DP group with a free batch slot and room for its KV. Room is what the backends' heartbeats
report (``capacity``/``running``/``queued`` of a prefill; ``max_batch``/``running``/
``queued``/``free_kv_blocks`` of a decode master) less what this router sent them since
their last beat (beats lag by up to one interval) and less what it holds between the two
(prefilled or prefilling requests that will need a batch slot). Busy is never dead: a full
backend only holds the queue. A backend that reports no capacity (an older or a test peer)
counts as unbounded for that figure.

Two routers share the backends. Each takes at most its share of the room: the room divided
by the number of routers with requests waiting (from the routers' own beats), so neither
starves the other; an overshoot (both saw the same room) is absorbed by the backends' own
queues, which serve in arrival order.

A DP group may queue ``decode_slack`` requests beyond its batch: prefill then overlaps
decode, and a slot freed at a step is filled at the next instead of a prefill later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

UNBOUNDED = math.inf


class PeerView(Protocol):
    role: str
    load: dict[str, float]
    last_beat_s: float

    @property
    def usable(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class InFlight:
    """One of this router's live requests past the queue, as admission sees it."""
    prefill: str = ""          # set while its Prefill is out
    prefill_sent_s: float = 0.0
    decode: str = ""           # set once an Admit went to that group
    admitted_s: float | None = None   # when the group answered the Admit (None: not yet)
    kv_blocks: int = 0


@dataclass(slots=True)
class Rooms:
    prefill: dict[str, float]          # free slots per usable prefill
    decode: dict[str, list[float]]     # per usable DP group: [free batch slots, free KV blocks]
    pending: int                       # ours, needing a batch slot not yet taken (prefilling, prefilled)


def rooms(peers: Mapping[str, PeerView], inflight: Iterable[InFlight], *, max_batch: int,
          decode_slack: int) -> Rooms:
    pre_unreported: dict[str, int] = {}
    dec_unreported: dict[str, list[int]] = {}
    pending = 0
    for f in inflight:
        if f.decode:
            p = peers.get(f.decode)
            if p is not None and (f.admitted_s is None or f.admitted_s >= p.last_beat_s):
                slot = dec_unreported.setdefault(f.decode, [0, 0])
                slot[0] += 1
                slot[1] += f.kv_blocks
            continue
        pending += 1
        if f.prefill:
            p = peers.get(f.prefill)
            if p is not None and f.prefill_sent_s >= p.last_beat_s:
                pre_unreported[f.prefill] = pre_unreported.get(f.prefill, 0) + 1
    pre: dict[str, float] = {}
    dec: dict[str, list[float]] = {}
    for name, p in peers.items():
        if not p.usable:
            continue
        ld = p.load
        if p.role == "prefill":
            cap = ld.get("capacity", UNBOUNDED)
            pre[name] = cap - ld.get("running", 0.0) - pre_unreported.get(name, 0)
        elif p.role == "decode":
            sent, blocks = dec_unreported.get(name, (0, 0))
            batch = ld.get("max_batch", float(max_batch))
            slots = batch + decode_slack - ld.get("running", 0.0) - ld.get("queued", 0.0) - sent
            dec[name] = [slots, ld.get("free_kv_blocks", UNBOUNDED) - blocks]
    return Rooms(pre, dec, pending)


def admit_count(r: Rooms, needs: Iterable[int], *, routers_waiting: int = 0) -> int:
    """How many of the queue's head requests (``needs``: each one's KV blocks, in queue
    order) may leave it now. Takes a free prefill slot and a DP group slot with room for the
    KV per request, after ``pending`` requests already on their way claimed theirs; stops at
    the first that does not fit (FCFS: a large request is not overtaken). With
    ``routers_waiting`` other routers queueing too, this one takes its share of the slots."""
    if not r.prefill or not r.decode:
        return 0
    pre = dict(r.prefill)
    groups = {n: list(v) for n, v in r.decode.items()}
    total = sum(max(0.0, s) for s, _ in groups.values()) - r.pending
    share = math.ceil(total / (1 + routers_waiting)) if total > 0 else 0
    # ``pending`` requests will take slots: charge them to the groups with most room first.
    owed = r.pending
    for n in sorted(groups, key=lambda n: -groups[n][0]):
        if owed <= 0:
            break
        take = min(owed, max(0.0, groups[n][0]))
        groups[n][0] -= take
        owed -= take
    n_out = 0
    for need in needs:
        if n_out >= share:
            break
        p = max(pre, key=lambda n: pre[n])
        if pre[p] < 1:
            break
        fits = [n for n, (s, free) in groups.items() if s >= 1 and free >= need]
        if not fits:
            break
        g = max(fits, key=lambda n: (groups[n][1], groups[n][0]))
        pre[p] -= 1
        groups[g][0] -= 1
        groups[g][1] -= need
        n_out += 1
    return n_out
