"""Which expert ranks one dispatch source posts to: a pure lifecycle per rank, no I/O, no clock.

A source (attention rank) takes a rank OUT on evidence that it fails: a put error, a refusal,
no answer to an attempt in time (``failed``), or heartbeat silence for the detector's
dead-after window (``silent``). It takes it back IN on evidence that the rank serves again: a
heartbeat published after the failure, i.e. one of a new epoch (a restart) or with a larger
sequence number than the last beat seen before the failure (a continued SIGSTOP, or a rank
that was only slow). A beat from before the failure proves nothing and changes nothing.

Why heartbeats are enough to come back: an expert is stateless between events and answers a
source's blocks in order, so a rank that was written to while it hung answers those old
events first, and they are stale by event id at the source (``LayerAttempts``). An operator's
``exclude`` is sticky: only ``include`` undoes it.

Lifecycle (the whole table; anything else is an ``IllegalTransition``)::

    IN  --failure|silence-->  OUT  --newer beat-->  IN
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RankState(enum.StrEnum):
    IN = "in"
    OUT = "out"


class RankEvent(enum.StrEnum):
    BEAT = "beat"            # a heartbeat newer than what was known at the failure
    FAILURE = "failure"      # transport error, refusal, missing answer
    SILENCE = "silence"      # the heartbeat detector declared it dead


TRANSITIONS: dict[tuple[RankState, RankEvent], RankState] = {
    (RankState.IN, RankEvent.BEAT): RankState.IN,
    (RankState.IN, RankEvent.FAILURE): RankState.OUT,
    (RankState.IN, RankEvent.SILENCE): RankState.OUT,
    (RankState.OUT, RankEvent.BEAT): RankState.IN,
    (RankState.OUT, RankEvent.FAILURE): RankState.OUT,
    (RankState.OUT, RankEvent.SILENCE): RankState.OUT,
}


class IllegalTransition(RuntimeError):
    def __init__(self, rank: int, state: RankState, event: RankEvent) -> None:
        super().__init__(f"rank health: expert rank {rank}: event {event.value!r} is illegal in state {state.value!r}")
        self.rank, self.state, self.event = rank, state, event


@dataclass(frozen=True, slots=True)
class RankChange:
    rank: int
    old: RankState
    new: RankState
    why: str


@dataclass(slots=True)
class _Rank:
    state: RankState = RankState.IN
    why: str = ""
    epoch: str | None = None    # of the newest beat seen
    seq: int = -1
    # What was known when it went OUT: only a beat newer than this brings it back.
    out_epoch: str | None = None
    out_seq: int = -1
    pinned: bool = False        # excluded by an operator: beats do not bring it back
    failures: int = 0


class RankHealth:
    def __init__(self, num_ranks: int) -> None:
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        self._ranks = [_Rank() for _ in range(num_ranks)]

    def _fire(self, rank: int, event: RankEvent, why: str) -> RankChange | None:
        r = self._ranks[rank]
        new = TRANSITIONS.get((r.state, event))
        if new is None:
            raise IllegalTransition(rank, r.state, event)
        old, r.state = r.state, new
        if new is RankState.OUT and old is RankState.IN:
            r.out_epoch, r.out_seq, r.why = r.epoch, r.seq, why
        elif new is RankState.IN:
            r.why = ""
        return RankChange(rank, old, new, why) if old is not new else None

    def _check(self, rank: int) -> None:
        if not 0 <= rank < len(self._ranks):
            raise ValueError(f"expert rank {rank} outside 0..{len(self._ranks) - 1}")

    def beat(self, rank: int, epoch: str, seq: int) -> RankChange | None:
        """A heartbeat of ``rank``; brings it back IN when it was published after the failure."""
        self._check(rank)
        r = self._ranks[rank]
        if r.epoch == epoch and seq <= r.seq:
            return None   # duplicate or reordered
        r.epoch, r.seq = epoch, seq
        if r.state is RankState.OUT and (r.pinned or (epoch == r.out_epoch and seq <= r.out_seq)):
            return None
        why = "heartbeat of a new epoch (restarted)" if epoch != r.out_epoch else "heartbeat after the failure"
        return self._fire(rank, RankEvent.BEAT, why)

    def failed(self, rank: int, why: str) -> RankChange | None:
        self._check(rank)
        self._ranks[rank].failures += 1
        return self._fire(rank, RankEvent.FAILURE, why)

    def silent(self, rank: int, why: str) -> RankChange | None:
        self._check(rank)
        return self._fire(rank, RankEvent.SILENCE, why)

    def exclude(self, rank: int, why: str = "excluded by the operator") -> RankChange | None:
        self._check(rank)
        self._ranks[rank].pinned = True
        return self._fire(rank, RankEvent.FAILURE, why)

    def include(self, rank: int) -> RankChange | None:
        """Undo ``exclude`` (and any failure): the rank is IN now."""
        self._check(rank)
        r = self._ranks[rank]
        r.pinned = False
        return self._fire(rank, RankEvent.BEAT, "included by the operator")

    @property
    def excluded(self) -> frozenset[int]:
        return frozenset(i for i, r in enumerate(self._ranks) if r.state is RankState.OUT)

    def state(self, rank: int) -> RankState:
        self._check(rank)
        return self._ranks[rank].state

    def why(self, rank: int) -> str:
        self._check(rank)
        return self._ranks[rank].why

    def failures(self, rank: int) -> int:
        self._check(rank)
        return self._ranks[rank].failures
