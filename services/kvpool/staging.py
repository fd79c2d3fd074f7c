"""Prefill's KV staging area: where a computed sequence's KV waits for its decode rank (pure).

The prefill keeps the packed KV of every sequence it answered in its own XCCL window
``kv_stage`` (``capacity_blocks`` pool-layout blocks), and the ``KVRef`` it returns names that
place (``source``, ``stage_offset``, ``stage_id``, ``digest``). The attention rank pulls the
bytes one-sided (the paper's DistFlow: prefill -> decode directly, no pool in the path) and
then tells the prefill to release the stage. So the KV pool is a prefix cache and a second
copy, never the only way a hand-off can go.

Lifecycle of a stage (one table, ``STAGE_TRANSITIONS``): allocated -> released (the rank
acknowledged) | reclaimed (its lease ran out *and* the space was needed). Leases are lazy:
an expired stage keeps its bytes until an allocation needs the room, so a request that sat
long in a decode queue still finds its KV if nobody needed the space. A reader never trusts
bytes it cannot verify: the ``digest`` in the ref is checked after the get, so a reclaimed
and rewritten stage is detected (and the rank falls back to the pool), never decoded.

Stage ids are unique per process lifetime; a late or duplicate release (of a stage already
released or reclaimed, or naming another owner) is ignored and counted, never frees
someone else's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGE_TRANSITIONS = {("allocated", "release"): "released", ("allocated", "reclaim"): "reclaimed"}


class StagingTooSmall(ValueError):
    """A sequence needs more blocks than the whole staging area has (a configuration error)."""


@dataclass(frozen=True, slots=True)
class Stage:
    stage_id: int
    owner: str
    first_block: int
    nblocks: int
    expires: float


@dataclass(slots=True)
class StagingStats:
    allocated: int = 0
    released: int = 0
    reclaimed: int = 0
    stale_releases: int = 0
    full: int = 0              # allocations that found no room


class StagingArea:
    def __init__(self, capacity_blocks: int, *, lease_s: float) -> None:
        if capacity_blocks < 1 or not lease_s > 0:
            raise ValueError(f"capacity_blocks {capacity_blocks} must be >= 1 and lease_s {lease_s} > 0")
        self.capacity, self.lease_s = capacity_blocks, lease_s
        self._stages: dict[int, Stage] = {}     # by stage id; allocation order = id order
        self._next_id = 1
        self.stats = StagingStats()

    @property
    def used_blocks(self) -> int:
        return sum(s.nblocks for s in self._stages.values())

    def __len__(self) -> int:
        return len(self._stages)

    def alloc(self, owner: str, nblocks: int, now: float) -> Stage | None:
        """A place for ``nblocks`` blocks, or None when every block is held by a live lease.
        Expired stages are reclaimed, oldest first, only when the room is needed."""
        if not 1 <= nblocks <= self.capacity:
            raise StagingTooSmall(f"{owner}: {nblocks} blocks do not fit a staging area of {self.capacity}")
        while True:
            first = self._first_fit(nblocks)
            if first is not None:
                st = Stage(self._next_id, owner, first, nblocks, now + self.lease_s)
                self._next_id += 1
                self._stages[st.stage_id] = st
                self.stats.allocated += 1
                return st
            expired = next((s for s in self._stages.values() if s.expires <= now), None)
            if expired is None:
                self.stats.full += 1
                return None
            del self._stages[expired.stage_id]
            self.stats.reclaimed += 1

    def release(self, stage_id: int, owner: str) -> bool:
        """The reader is done (or the hand-off is abandoned). Idempotent; a stale id or a
        different owner changes nothing and returns False."""
        st = self._stages.get(stage_id)
        if st is None or st.owner != owner:
            self.stats.stale_releases += 1
            return False
        del self._stages[stage_id]
        self.stats.released += 1
        return True

    def _first_fit(self, nblocks: int) -> int | None:
        at = 0
        for s in sorted(self._stages.values(), key=lambda s: s.first_block):
            if s.first_block - at >= nblocks:
                return at
            at = max(at, s.first_block + s.nblocks)
        return at if self.capacity - at >= nblocks else None
