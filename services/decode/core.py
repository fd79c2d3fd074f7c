"""Decode master core: one DP group's scheduler (pure: no sockets, no asyncio, no clock).

The server feeds it admissions, cancels, ``Loaded`` answers and step results; it answers with
effects (``SendLoad``, ``SendFree``, ``Emit``) and step plans (one ``Run`` per attention rank).

Rules:
- Admission is FIFO and bounded: beyond ``max_queue`` waiting requests, ``admit`` refuses with
  RESOURCE_EXHAUSTED (the router tries another group); nothing is ever dropped silently.
- KV accounting in blocks: a sequence reserves ``ceil((prompt_len + max_tokens) / block_size)``
  blocks when it leaves the queue, and gives them back when it ends. The group's ``kv_blocks``
  are split evenly between its attention ranks (``kv_blocks // ranks`` each, as the ranks
  budget their caches), so a sequence goes to a live rank that has room for it: of those, the
  one with the fewest sequences (then the most free blocks). When the head of the queue
  does not fit (blocks or ``max_batch``), everything behind it waits too (no starvation of long
  requests by short ones): that is the backpressure.
- Continuous batching: ``loading + running <= max_batch``; a sequence joins at the next step
  after its ``Loaded``. One step is in flight at a time; a sequence that ends while its step is
  in flight keeps its blocks and gets its ``Free`` only when that step completes, so an attention
  rank never frees a cache it is still computing on.
- Token positions follow the reference engine: with ``generated`` tokens out (the last one,
  ``last_token``, not yet fed), the step feeds ``last_token`` at ``prompt_len + generated - 1`` and
  samples output number ``generated`` at position ``prompt_len + generated``.
- Lifecycle is the table ``TRANSITIONS``; anything else raises ``IllegalTransition``.
- A request id has one live sequence here. An ``Admit`` for an id the group already holds is
  a retry when it is the same admission (same router, resume point and KV): idempotent. Any
  other is a *takeover*: the client resumed on another router (or the router replayed the
  request), so the old sequence ends silently (its router is gone or has moved on: nothing is
  pushed to it) and the new one runs from its own resume point. The new one waits until the
  old one is fully released (its in-flight step completed, its ``Free`` queued), so the rank
  sees ``Free(id)`` before the new ``Load(id)`` and no step result of the old sequence is
  sampled for the new one. A rank answers in order, so a ``Loaded`` of a load whose sequence
  already ended (and got its ``Free``) is recognised by counting and ignored.
- A router's ``Cancel`` names the router: it ends only that router's admission of the id. A
  router that lost the id (it hung, the client resumed on another router, which re-admitted it
  here) answers the old sequence's late pushes with Cancels; those are refused (NOT_FOUND) and
  the new owner's sequence runs on.
- A sequence that fails ends with ``Tokens(finish_reason="error", error=message, code=UNAVAILABLE)``:
  every such failure is the group's (a rank lost it), so the router replays it elsewhere; "cancelled" is pushed only when the master
  itself gives a sequence up (shutdown), which tells the router to replay it elsewhere.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.common.status import Code, Refused
from services.model.sampling import SamplingParams, sample
from services.protocol.inference import KVRef, Tokens
from services.protocol.step import Free, Load, Run



class SeqState(enum.StrEnum):
    QUEUED = "queued"
    LOADING = "loading"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class SeqEvent(enum.StrEnum):
    LOAD = "load"          # left the queue: blocks reserved, Load sent to a rank
    LOADED = "loaded"      # the rank holds the KV
    FINISH = "finish"      # stop token or max_tokens
    CANCEL = "cancel"
    FAIL = "fail"          # load failed, rank silent or broken


TRANSITIONS: dict[tuple[SeqState, SeqEvent], SeqState] = {
    (SeqState.QUEUED, SeqEvent.LOAD): SeqState.LOADING,
    (SeqState.QUEUED, SeqEvent.CANCEL): SeqState.CANCELLED,
    (SeqState.QUEUED, SeqEvent.FAIL): SeqState.FAILED,
    (SeqState.LOADING, SeqEvent.LOADED): SeqState.RUNNING,
    (SeqState.LOADING, SeqEvent.CANCEL): SeqState.CANCELLED,
    (SeqState.LOADING, SeqEvent.FAIL): SeqState.FAILED,
    (SeqState.RUNNING, SeqEvent.FINISH): SeqState.FINISHED,
    (SeqState.RUNNING, SeqEvent.CANCEL): SeqState.CANCELLED,
    (SeqState.RUNNING, SeqEvent.FAIL): SeqState.FAILED,
}
TERMINAL = frozenset({SeqState.FINISHED, SeqState.CANCELLED, SeqState.FAILED})


class IllegalTransition(RuntimeError):
    def __init__(self, request_id: str, state: SeqState, event: SeqEvent) -> None:
        super().__init__(f"decode request {request_id!r}: illegal event {event.value!r} in state {state.value!r}")
        self.request_id, self.state, self.event = request_id, state, event


def next_state(request_id: str, state: SeqState, event: SeqEvent) -> SeqState:
    nxt = TRANSITIONS.get((state, event))
    if nxt is None:
        raise IllegalTransition(request_id, state, event)
    return nxt


@dataclass(frozen=True, slots=True)
class CoreConfig:
    block_size: int
    kv_blocks: int                  # the group's, split evenly between its ranks
    max_batch: int
    ranks: tuple[str, ...]          # the group's attention ranks
    max_queue: int = 64
    max_positions: int = 1 << 30    # the model's position limit

    def __post_init__(self) -> None:
        for key in ("block_size", "kv_blocks", "max_batch", "max_queue", "max_positions"):
            if getattr(self, key) < 1:
                raise ValueError(f"CoreConfig.{key} must be >= 1")
        if not self.ranks:
            raise ValueError("CoreConfig.ranks: a DP group needs at least one attention rank")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError("CoreConfig.ranks: duplicate rank names")

    @property
    def rank_blocks(self) -> int:
        """Each rank's KV budget (the attention rank computes the same)."""
        return max(1, self.kv_blocks // len(self.ranks))


@dataclass(frozen=True, slots=True)
class Request:
    """An admission, already decoded from the wire (``Admit`` plus the pushing router)."""
    request_id: str
    prompt_len: int
    params: SamplingParams
    kv: KVRef
    next_token: int
    generated: int                  # outputs so far, next_token included (it is output generated-1)
    router: str


# -- effects ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SendLoad:
    rank: str
    load: Load


@dataclass(frozen=True, slots=True)
class SendFree:
    rank: str
    free: Free


@dataclass(frozen=True, slots=True)
class Emit:
    router: str
    tokens: Tokens


Effect = SendLoad | SendFree | Emit


@dataclass(frozen=True, slots=True)
class StepPlan:
    step: int
    runs: tuple[tuple[str, Run], ...]   # (rank, Run) for every rank with running sequences


@dataclass(frozen=True, slots=True)
class StepRefused:
    """A rank answered a Run with an error: that step's sequences on it fail, the rank stays."""
    error: str


@dataclass(slots=True)
class _Seq:
    req: Request
    blocks: int
    state: SeqState = SeqState.QUEUED
    rank: str = ""
    generated: int = 0
    last_token: int = 0

    @property
    def rid(self) -> str:
        return self.req.request_id


@dataclass(slots=True)
class CoreStats:
    admitted: int = 0
    refused: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    tokens: int = 0
    queue_peak: int = 0
    takeovers: int = 0


def blocks_for(prompt_len: int, max_tokens: int, block_size: int) -> int:
    return math.ceil((prompt_len + max_tokens) / block_size)


class DecodeCore:
    def __init__(self, cfg: CoreConfig) -> None:
        self.cfg = cfg
        self._free: dict[str, int] = {r: cfg.rank_blocks for r in cfg.ranks}
        self.stats = CoreStats()
        self._seqs: dict[str, _Seq] = {}         # every non-terminal sequence
        self._queue: deque[_Seq] = deque()
        self._by_rank: dict[str, set[str]] = {r: set() for r in cfg.ranks}   # loading + running
        self._down: set[str] = set()
        self._step = 0
        self._inflight: StepPlan | None = None
        self._inflight_ids: set[str] = set()
        self._deferred: list[_Seq] = []           # ended during the in-flight step
        self._releasing: set[str] = set()         # ids of deferred sequences (their Free not sent yet)
        self._successors: dict[str, Request] = {} # takeovers waiting for the old sequence's release
        self._stale_loads: dict[tuple[str, str], int] = {}   # (id, rank): Loaded answers to ignore

    # -- views -----------------------------------------------------------------------------
    def state_of(self, request_id: str) -> SeqState | None:
        s = self._seqs.get(request_id)
        return s.state if s else None

    def count(self, state: SeqState) -> int:
        return sum(1 for s in self._seqs.values() if s.state is state)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def has_running(self) -> bool:
        return any(s.state is SeqState.RUNNING for s in self._seqs.values())

    @property
    def step_in_flight(self) -> int | None:
        return self._inflight.step if self._inflight else None

    @property
    def free_blocks(self) -> int:
        """Free KV blocks on the live ranks."""
        return sum(n for r, n in self._free.items() if r not in self._down)

    @property
    def total_blocks(self) -> int:
        """KV blocks of the live ranks."""
        return self.cfg.rank_blocks * (len(self.cfg.ranks) - len(self._down))

    def load(self) -> dict[str, float]:
        """Heartbeat load (what routers choose a group by)."""
        return {"running": self.count(SeqState.RUNNING) + self.count(SeqState.LOADING),
                "queued": len(self._queue), "free_kv_blocks": self.free_blocks,
                "max_batch": self.cfg.max_batch, "live_ranks": len(self.cfg.ranks) - len(self._down)}

    # -- lifecycle ---------------------------------------------------------------------------
    def _move(self, s: _Seq, event: SeqEvent) -> None:
        s.state = next_state(s.rid, s.state, event)

    def admit(self, req: Request) -> list[Effect]:
        """Queue ``req`` and start what fits; a retried Admit is idempotent, any other Admit of
        a held request id takes it over (see the module rules). Raises ``Refused``."""
        rid = req.request_id
        old = self._seqs.get(rid)
        waiting = self._successors.get(rid)
        if (waiting or (old.req if old else None)) == req:
            return []   # a retried Admit: already here
        try:
            self._check(req)
        except Refused:
            self.stats.refused += 1
            raise
        if old is None and rid not in self._releasing:
            return self._enqueue(req)
        self.stats.takeovers += 1
        self._successors[rid] = req     # replaces a successor that was itself taken over
        out: list[Effect] = []
        if old is not None:
            out = [e for e in self._end(old, SeqEvent.CANCEL) if not isinstance(e, Emit)]
        if rid not in self._releasing and rid in self._successors:
            out += self._enqueue(self._successors.pop(rid))
        return out

    def _enqueue(self, req: Request) -> list[Effect]:
        s = _Seq(req, blocks_for(req.prompt_len, req.params.max_tokens, self.cfg.block_size),
                 generated=req.generated, last_token=req.next_token)
        self._seqs[req.request_id] = s
        self._queue.append(s)
        self.stats.admitted += 1
        self.stats.queue_peak = max(self.stats.queue_peak, len(self._queue))
        return self._promote()

    def _check(self, req: Request) -> None:
        p, rid = req.params, req.request_id
        if not rid:
            raise Refused(Code.INVALID_ARGUMENT, "request_id is empty")
        if req.prompt_len < 1:
            raise Refused(Code.INVALID_ARGUMENT, f"{rid}: prompt_len must be >= 1, got {req.prompt_len}")
        if not 1 <= req.generated < p.max_tokens:
            raise Refused(Code.INVALID_ARGUMENT, f"{rid}: generated must be in 1..max_tokens-1 "
                          f"(max_tokens={p.max_tokens}), got {req.generated}: nothing left to decode")
        if req.next_token in p.stop_token_ids:
            raise Refused(Code.INVALID_ARGUMENT, f"{rid}: next_token {req.next_token} is a stop token: already finished")
        want = req.prompt_len + req.generated - 1
        if req.kv.num_tokens != want:
            raise Refused(Code.INVALID_ARGUMENT, f"{rid}: kv holds {req.kv.num_tokens} positions, expected "
                          f"prompt_len + generated - 1 = {want}")
        if req.prompt_len + p.max_tokens > self.cfg.max_positions:
            raise Refused(Code.INVALID_ARGUMENT, f"{rid}: prompt_len + max_tokens = {req.prompt_len + p.max_tokens} "
                          f"exceeds the model's {self.cfg.max_positions} positions")
        need = blocks_for(req.prompt_len, p.max_tokens, self.cfg.block_size)
        if need > self.cfg.rank_blocks:
            raise Refused(Code.RESOURCE_EXHAUSTED, f"{rid}: needs {need} KV blocks, an attention rank of this group has "
                          f"{self.cfg.rank_blocks} in all")
        if len(self._down) == len(self.cfg.ranks):
            raise Refused(Code.UNAVAILABLE, "no live attention rank in this DP group")
        if len(self._queue) >= self.cfg.max_queue:
            raise Refused(Code.RESOURCE_EXHAUSTED, f"admission queue full ({self.cfg.max_queue} waiting)")

    def _promote(self) -> list[Effect]:
        out: list[Effect] = []
        live = [r for r in self.cfg.ranks if r not in self._down]
        while self._queue and live:
            s = self._queue[0]
            active = sum(len(v) for v in self._by_rank.values())
            fits = [r for r in live if self._free[r] >= s.blocks]
            if active >= self.cfg.max_batch or not fits:
                break
            self._queue.popleft()
            self._move(s, SeqEvent.LOAD)
            s.rank = min(fits, key=lambda r: (len(self._by_rank[r]), -self._free[r]))   # ties: first
            self._free[s.rank] -= s.blocks
            self._by_rank[s.rank].add(s.rid)
            capacity = s.req.prompt_len + s.req.params.max_tokens
            out.append(SendLoad(s.rank, Load(s.rid, s.req.kv, capacity)))
        return out

    def loaded(self, request_id: str, rank: str, error: str = "") -> list[Effect]:
        """A rank's ``Loaded``. Late answers for ended sequences are answered with a Free."""
        stale = self._stale_loads.get((request_id, rank), 0)
        if stale:   # the answer to a Load whose sequence ended: its Free went out after that Load
            if stale == 1:
                del self._stale_loads[(request_id, rank)]
            else:
                self._stale_loads[(request_id, rank)] = stale - 1
            return []
        s = self._seqs.get(request_id)
        if s is None or s.rank != rank:
            # It ended (cancel, load timeout) or never was ours on that rank: the rank may hold it now.
            return [] if error or rank not in self._by_rank else [SendFree(rank, Free((request_id,)))]
        if s.state is not SeqState.LOADING:
            return []   # a duplicate answer
        if error:
            return self._end(s, SeqEvent.FAIL, free_rank=False, load_answered=True,
                             error=f"attention rank {rank} could not load the KV: {error}")
        self._move(s, SeqEvent.LOADED)
        return []

    def load_failed(self, request_id: str, error: str) -> list[Effect]:
        """This one Load could not go out (the rank itself is not blamed)."""
        s = self._seqs.get(request_id)
        if s is None or s.state is not SeqState.LOADING:
            return []
        return self._end(s, SeqEvent.FAIL, load_answered=True, error=error)

    def cancel(self, request_id: str, router: str = "") -> list[Effect]:
        """The router's Cancel: it asked, so no final Tokens is pushed back (its Ok says it).
        With ``router`` (the sender), only that router's admission of the id is cancelled: a
        router that lost the id (the client resumed elsewhere, another router took it over)
        still sends Cancels for it (its strays: late pushes of the old sequence), and those
        must not end the new owner's sequence."""
        s = self._seqs.get(request_id)
        waiting = self._successors.get(request_id)
        held = s.req if s is not None else waiting
        if held is None:
            raise Refused(Code.NOT_FOUND, f"no request {request_id!r} on this decode group")
        if router and held.router != router:
            raise Refused(Code.NOT_FOUND, f"request {request_id!r} on this decode group is {held.router}'s "
                                          f"now, not {router}'s: not cancelled")
        if s is None:
            del self._successors[request_id]   # a takeover still waiting for its predecessor's release
            return []
        return [e for e in self._end(s, SeqEvent.CANCEL) if not isinstance(e, Emit)]

    def evict_all(self) -> list[Effect]:
        """Shutting down: end every sequence with finish_reason "cancelled", which tells its
        router to replay it on another group."""
        out: list[Effect] = []
        successors, self._successors = self._successors, {}
        for req in successors.values():
            out.append(Emit(req.router, Tokens(req.request_id, req.generated, (), "cancelled")))
        for s in [*self._queue, *self._seqs.values()]:   # the queue first: nothing gets promoted
            if s.state not in TERMINAL:
                out += self._end(s, SeqEvent.CANCEL)
        return out

    def _end(self, s: _Seq, event: SeqEvent, *, error: str = "", free_rank: bool = True,
             load_answered: bool = False) -> list[Effect]:
        """Terminal transition: final Tokens (unless it carried the last token), blocks back, Free."""
        was_queued = s.state is SeqState.QUEUED
        if s.state is SeqState.LOADING and not load_answered:
            key = (s.rid, s.rank)
            self._stale_loads[key] = self._stale_loads.get(key, 0) + 1
        self._move(s, event)
        del self._seqs[s.rid]
        out: list[Effect] = []
        if event is SeqEvent.CANCEL:
            self.stats.cancelled += 1
            out.append(Emit(s.req.router, Tokens(s.rid, s.generated, (), "cancelled")))
        elif event is SeqEvent.FAIL:
            self.stats.failed += 1
            # Every failure here is the group's, not the request's: the router replays it.
            out.append(Emit(s.req.router, Tokens(s.rid, s.generated, (), "error", error, Code.UNAVAILABLE)))
        else:
            self.stats.finished += 1
        if was_queued:
            self._queue.remove(s)
            return out
        if s.rid in self._inflight_ids:
            self._deferred.append(s)     # its step is still computing: free when it completes
            self._releasing.add(s.rid)
            return out
        out += self._release(s, free_rank)
        return out + self._promote()

    def _release(self, s: _Seq, send_free: bool) -> list[Effect]:
        self._free[s.rank] += s.blocks
        self._by_rank[s.rank].discard(s.rid)
        self._releasing.discard(s.rid)
        out: list[Effect] = [SendFree(s.rank, Free((s.rid,)))] if send_free else []
        successor = self._successors.pop(s.rid, None)
        if successor is not None:   # a takeover: its Load goes out after this Free
            out += self._enqueue(successor)
        return out

    # -- steps -------------------------------------------------------------------------------
    def plan_step(self) -> StepPlan | None:
        """The next step over every running sequence, or None (nothing runs, or one is in flight)."""
        if self._inflight is not None:
            return None
        per_rank: dict[str, list[_Seq]] = {}
        for s in self._seqs.values():
            if s.state is SeqState.RUNNING:
                per_rank.setdefault(s.rank, []).append(s)
        if not per_rank:
            return None
        self._step += 1
        runs = []
        for rank in self.cfg.ranks:
            seqs = per_rank.get(rank)
            if seqs:
                runs.append((rank, Run(self._step, tuple(s.rid for s in seqs), tuple(s.last_token for s in seqs),
                                       tuple(s.req.prompt_len + s.generated - 1 for s in seqs))))
        self._inflight = StepPlan(self._step, tuple(runs))
        self._inflight_ids = {rid for _, run in runs for rid in run.request_ids}
        return self._inflight

    def complete_step(self, step: int, results: Mapping[str, np.ndarray | StepRefused | str]) -> list[Effect]:
        """Results of the in-flight step, per rank: the ``[batch, vocab]`` float32 logits; a
        ``StepRefused`` (its sequences of this step end with an error); or a text saying why there
        is no answer (silent, unreachable) or a malformed one: then the rank is marked down and
        all its sequences end with finish_reason "error"."""
        plan = self._inflight
        if plan is None or plan.step != step:
            raise ValueError(f"complete_step({step}): the step in flight is {plan.step if plan else None}")
        self._inflight, self._inflight_ids = None, set()
        self.stats.steps += 1
        out: list[Effect] = []
        for rank, run in plan.runs:
            res = results.get(rank, f"attention rank {rank} gave no result for step {step}")
            if isinstance(res, np.ndarray) and (res.ndim != 2 or res.shape[0] != len(run.request_ids)
                                                or res.dtype != np.float32):
                res = (f"attention rank {rank} sent {res.dtype} logits of shape {res.shape} for "
                       f"{len(run.request_ids)} sequences (want float32 [batch, vocab])")
            if isinstance(res, str):
                out += self.rank_failed(rank, res)
                continue
            if isinstance(res, StepRefused):
                for rid in run.request_ids:
                    s = self._seqs.get(rid)
                    if s is not None and s.state is SeqState.RUNNING:
                        out += self._end(s, SeqEvent.FAIL, error=f"attention rank {rank} refused "
                                                                 f"step {step}: {res.error}")
                continue
            for rid, row in zip(run.request_ids, res):
                s = self._seqs.get(rid)
                if s is not None and s.state is SeqState.RUNNING:
                    out += self._emit(s, row)
        deferred, self._deferred = self._deferred, []
        for s in deferred:
            out += self._release(s, True)
        return out + self._promote()

    def _emit(self, s: _Seq, row: np.ndarray) -> list[Effect]:
        p = s.req.params
        tok = sample(row, p, s.rid, s.req.prompt_len + s.generated)
        index = s.generated
        s.generated += 1
        s.last_token = tok
        self.stats.tokens += 1
        reason = "stop" if tok in p.stop_token_ids else "length" if s.generated >= p.max_tokens else ""
        out: list[Effect] = [Emit(s.req.router, Tokens(s.rid, index, (tok,), reason))]
        if reason:
            out += self._end(s, SeqEvent.FINISH)
        return out

    def is_down(self, rank: str) -> bool:
        return rank in self._down

    def rank_failed(self, rank: str, error: str) -> list[Effect]:
        """``rank`` did not answer (a step or a Load) in time, or could not be reached: its
        sequences end with an error and it takes no new ones until ``rank_up``. They are still
        freed on it: a rank that was only slow keeps a clean cache for when it is back."""
        if rank not in self._by_rank:
            raise ValueError(f"{rank!r} is not an attention rank of this group")
        self._down.add(rank)
        out: list[Effect] = []
        for rid in sorted(self._by_rank[rank]):
            s = self._seqs.get(rid)
            if s is not None:
                out += self._end(s, SeqEvent.FAIL, error=error)
        if len(self._down) == len(self.cfg.ranks):
            for s in list(self._queue):
                out += self._end(s, SeqEvent.FAIL, error="no live attention rank in this DP group")
        return out

    def rank_up(self, rank: str) -> list[Effect]:
        """A rank that was marked down answers again (a late answer, or restarted with an empty
        cache): use it for new admissions."""
        if rank in self._down and not self._by_rank[rank]:
            self._free[rank] = self.cfg.rank_blocks
            # Restarted (or drained): it will not answer the Loads it had.
            self._stale_loads = {k: n for k, n in self._stale_loads.items() if k[1] != rank}
        self._down.discard(rank)
        return self._promote()


__all__ = ["DecodeCore", "CoreConfig", "Request", "Refused", "IllegalTransition", "SeqState", "SeqEvent",
           "TRANSITIONS", "next_state", "StepRefused", "SendLoad", "SendFree", "Emit", "StepPlan", "blocks_for"]
