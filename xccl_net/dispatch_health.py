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

Pairwise reachability (CUT): a put the fabric refuses (``LinkDown``: a link on the path down,
or a partition between this source and the rank) says nothing of the rank itself: other
sources keep using it, and its heartbeats (which do not cross the fabric) keep coming. So
such a rank is CUT for this source only, and beats do not bring it back; a fabric probe of
the same path that goes through (``reachable``) does. Silence while CUT is death (OUT).

Lifecycle (the whole table; anything else is an ``IllegalTransition``)::

    IN  --failure|silence-->  OUT  --newer beat-->  IN
    IN|OUT  --unreachable-->  CUT  --reachable-->  IN
    CUT  --silence-->  OUT;   CUT  --beat|failure|unreachable-->  CUT
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RankState(enum.StrEnum):
    IN = "in"
    OUT = "out"
    CUT = "cut"              # alive, but the fabric path from this source to it is refused


class RankEvent(enum.StrEnum):
    BEAT = "beat"            # a heartbeat newer than what was known at the failure
    FAILURE = "failure"      # transport error, refusal, missing answer
    SILENCE = "silence"      # the heartbeat detector declared it dead
    UNREACHABLE = "unreachable"  # the fabric refused a transfer to it (LinkDown, partition)
    REACHABLE = "reachable"      # a fabric probe of the path went through


TRANSITIONS: dict[tuple[RankState, RankEvent], RankState] = {
    (RankState.IN, RankEvent.BEAT): RankState.IN,
    (RankState.IN, RankEvent.FAILURE): RankState.OUT,
    (RankState.IN, RankEvent.SILENCE): RankState.OUT,
    (RankState.OUT, RankEvent.BEAT): RankState.IN,
    (RankState.OUT, RankEvent.FAILURE): RankState.OUT,
    (RankState.OUT, RankEvent.SILENCE): RankState.OUT,
    (RankState.IN, RankEvent.UNREACHABLE): RankState.CUT,
    (RankState.OUT, RankEvent.UNREACHABLE): RankState.CUT,
    (RankState.IN, RankEvent.REACHABLE): RankState.IN,
    (RankState.OUT, RankEvent.REACHABLE): RankState.OUT,
    (RankState.CUT, RankEvent.UNREACHABLE): RankState.CUT,
    (RankState.CUT, RankEvent.REACHABLE): RankState.IN,
    (RankState.CUT, RankEvent.BEAT): RankState.CUT,
    (RankState.CUT, RankEvent.FAILURE): RankState.CUT,
    (RankState.CUT, RankEvent.SILENCE): RankState.OUT,
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
    cuts: int = 0               # times the fabric cut this source off from it


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
        if new is RankState.OUT and old is not RankState.OUT:
            r.out_epoch, r.out_seq, r.why = r.epoch, r.seq, why
        elif new is RankState.CUT and old is not RankState.CUT:
            r.why = why
            r.cuts += 1
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

    def unreachable(self, rank: int, why: str) -> RankChange | None:
        """The fabric refused a transfer from this source to ``rank``: CUT until a probe passes."""
        self._check(rank)
        return self._fire(rank, RankEvent.UNREACHABLE, why)

    def reachable(self, rank: int) -> RankChange | None:
        """A fabric probe from this source to ``rank`` went through (brings a CUT rank back)."""
        self._check(rank)
        return self._fire(rank, RankEvent.REACHABLE, "the fabric path is back")

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
        """Ranks not posted to: OUT (failed, dead) or CUT (unreachable from this source)."""
        return frozenset(i for i, r in enumerate(self._ranks) if r.state is not RankState.IN)

    @property
    def cut(self) -> frozenset[int]:
        """Ranks alive as far as we know but unreachable from this source over the fabric."""
        return frozenset(i for i, r in enumerate(self._ranks) if r.state is RankState.CUT)

    def cuts(self, rank: int) -> int:
        self._check(rank)
        return self._ranks[rank].cuts

    def state(self, rank: int) -> RankState:
        self._check(rank)
        return self._ranks[rank].state

    def why(self, rank: int) -> str:
        self._check(rank)
        return self._ranks[rank].why

    def failures(self, rank: int) -> int:
        self._check(rank)
        return self._ranks[rank].failures
