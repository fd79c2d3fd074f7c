"""MoE dispatch (A2E) and combine (E2A) over XCCL endpoints: the thin async shell of
``xccl_net.dispatch_core``.

- ``A2EDispatcher`` (attention rank ``source``): one put+notify per live expert rank into that
  rank's "a2e" block for this source, then waits for every rank's E2A answer in its own "e2a"
  window and applies the gate weights.
- ``E2AHandler`` (expert rank ``rank``): serves each source on its own: as soon as one
  source's A2E block arrives it runs the experts on it and answers that source with one
  put+notify into its "e2a" block. It never waits for other sources, so DP groups step
  independently (each source numbers its own events).

Each object owns its endpoint's notify stream (``recv_notify``): do not share an endpoint's
notifications with another consumer. Every wait is bounded by the caller's ``timeout_s``:
a missing peer is ``XcclTimeout`` naming who is missing, a dead one ``PeerUnreachable`` --
unless the dispatcher has a ``Failover``: then a failing rank's rows go to a live replica in
a new attempt of the same layer (``LayerAttempts``), and only an expert with no live holder
for ``Failover.wait_s`` fails the layer (``ExpertUnavailable``).

Reachability is per pair (source, expert rank): a put the fabric refuses (``LinkDown``: a link
down, a partition) takes that rank out for this source only (``RankState.CUT``) until a fabric
probe of the same path goes through (``watch_paths``); an expert whose every holder is CUT
fails the layer at once (``ExpertCutOff``: this group is cut off, the others are not). With a
``ReplicaChooser`` the rows of an expert go to its fastest, least-loaded live holder
(``replica_choice``) instead of the first one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.logging import get_logger
from xccl_net.dispatch_core import (
    DTYPE,
    BlockMeta,
    DispatchLayout,
    DispatchPlan,
    ExpertFn,
    LayerAttempts,
    NoLiveReplica,
    Placement,
    SourceGuard,
    Verdict,
    a2e_meta,
    decode_meta,
    e2a_meta,
    encode_meta,
    pack_rows,
    plan_dispatch,
    run_block,
    run_blocks,
    unpack_event_id,
)
from xccl_net.dispatch_health import RankChange, RankHealth, RankState
from xccl_net.endpoint import Notification, PutSpec
from xccl_net.replica_choice import ReplicaChooser
from xccl_net.errors import (
    CorruptMetadata,
    ExpertCutOff,
    ExpertRefused,
    ExpertUnavailable,
    FabricUnavailable,
    LinkDown,
    PeerUnreachable,
    ProtocolError,
    XcclError,
    XcclTimeout,
)

log = get_logger(component="dispatch")


@dataclass(frozen=True, slots=True)
class DispatchWindows:
    """Names of the app windows dispatch uses (registered at endpoint open)."""

    a2e: str = "a2e"
    e2a: str = "e2a"


@dataclass(frozen=True, slots=True)
class Notice:
    """One decoded notification: who wrote, where, and what its metadata says."""

    src: str
    window: str
    nbytes: int
    meta: BlockMeta


def _flat_bytes(a: np.ndarray) -> np.ndarray:
    """A 1-D uint8 view (no copy): a zero-row [0, H] array is not castable by memoryview."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


async def _next_notice(ep: Any, deadline: float, waiting_for: str) -> Notice:
    left = _remaining(deadline)
    if left <= 0:
        raise XcclTimeout(f"timed out waiting for {waiting_for}")
    try:
        src, window, _offset, nbytes, notify = await ep.recv_notify(timeout_s=left)
    except XcclTimeout as exc:
        raise XcclTimeout(f"timed out waiting for {waiting_for}") from exc
    return Notice(src=src, window=window, nbytes=nbytes, meta=decode_meta(notify))


@dataclass(frozen=True, slots=True)
class Failover:
    """How a source rides over expert-rank failures (pod spec ``experts.*``).

    ``answer_timeout_s``: how long one attempt waits for a rank's answer before that rank counts
    as failed for the step and its rows go to a replica (also the attempt's put timeout).
    ``wait_s``: with no live holder of an expert a layer needs, how long to wait for one to
    come back (a restart) before ``ExpertUnavailable``.
    """

    answer_timeout_s: float = 1.0
    wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.answer_timeout_s <= 0 or self.wait_s < 0:
            raise ValueError(f"Failover needs answer_timeout_s > 0 and wait_s >= 0, got {self}")


@dataclass(slots=True)
class PendingLayer:
    """A dispatched layer waiting for its E2A answers (possibly over several attempts)."""

    attempts: LayerAttempts
    x: np.ndarray
    layer_deadline: float                 # without failover: the whole layer's bound
    deadline: float = 0.0                 # the current attempt's
    wait_deadline: float | None = None    # set when the layer first had to wait for a replica
    posted_at: float = 0.0                # when the current attempt's blocks were posted

    @property
    def plan(self) -> DispatchPlan:
        assert self.attempts.plan is not None
        return self.attempts.plan


# Transport errors that mean "this rank, for this source, now": the rank fails for the step.
_RANK_ERRORS = (XcclTimeout, PeerUnreachable, LinkDown, FabricUnavailable, ProtocolError)


class A2EDispatcher:
    """Attention-rank side: ``run_layer`` = dispatch, wait for the experts, combine.

    Event ids are this source's own (increasing); ``incarnation`` must grow across restarts of
    the source (default: the wall clock in ns at construction) so the experts take a restarted
    source's fresh small ids as new, not stale.

    Without ``failover`` a failing rank fails the layer (a typed error naming it). With it, a
    rank that fails (put error, refusal, no answer within ``answer_timeout_s``) is taken out
    (``health``, see ``dispatch_health``) and its rows go to a live replica in a new attempt of
    the same layer; with no live holder of a needed expert the layer waits up to ``wait_s`` for
    one (``beat``/``silent`` feed the heartbeat view), then raises ``ExpertUnavailable``.
    """

    def __init__(self, ep: Any, *, source: int, expert_peers: Sequence[str], placement: Placement,
                 layout: DispatchLayout, windows: DispatchWindows = DispatchWindows(),
                 incarnation: int | None = None, failover: Failover | None = None,
                 chooser: ReplicaChooser | None = None,
                 probe: Callable[[int], Awaitable[None]] | None = None) -> None:
        if len(expert_peers) != layout.num_ranks:
            raise ValueError(f"{len(expert_peers)} expert peers for {layout.num_ranks} ranks")
        self.ep = ep
        self.source = source
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        self.expert_peers = tuple(expert_peers)
        self.placement = placement
        self.layout = layout
        self.windows = windows
        self.failover = failover
        self.health = RankHealth(layout.num_ranks)
        self.chooser = chooser
        self.probe = probe    # raises LinkDown when the fabric path to expert rank r is refused
        self.rows_to = [0] * layout.num_ranks     # rows sent to each expert rank (all attempts)
        self._changed = asyncio.Event()   # set on every health change: waits for a replica re-plan
        self._cut = asyncio.Event()       # set when a rank becomes CUT: wakes watch_paths
        self.stats = {"layers": 0, "stale_notices": 0, "rows_sent": 0, "retries": 0, "rank_failures": 0,
                      "refusals": 0, "replica_waits": 0, "unavailable": 0, "bad_notices": 0,
                      "pair_cuts": 0, "pair_heals": 0, "cut_off": 0}

    # -- expert rank health -----------------------------------------------------------------
    @property
    def excluded(self) -> frozenset[int]:
        return self.health.excluded

    def exclude(self, rank: int) -> None:
        """Stop dispatching to ``rank`` until ``include``: its experts are served by their next replica."""
        self._changed_to(self.health.exclude(rank))

    def include(self, rank: int) -> None:
        self._changed_to(self.health.include(rank))

    def beat(self, rank: int, epoch: str, seq: int) -> None:
        """A heartbeat of expert rank ``rank`` (brings a failed rank back when it is newer)."""
        self._changed_to(self.health.beat(rank, epoch, seq))

    def silent(self, rank: int, why: str) -> None:
        """The heartbeat detector declared expert rank ``rank`` dead."""
        self._changed_to(self.health.silent(rank, why))

    def _unreachable(self, rank: int, why: str) -> None:
        """The fabric refused this source's path to ``rank``: CUT for this source only."""
        change = self.health.unreachable(rank, why)
        if change is not None:
            self.stats["pair_cuts"] += 1
            self._cut.set()
        self._changed_to(change)

    def cut_off_experts(self) -> list[int]:
        """Experts whose every holder is alive but unreachable from this source."""
        cut = self.health.cut
        return [e for e, hs in enumerate(self.placement.holders) if all(r in cut for r in hs)]

    async def watch_paths(self, interval_s: float) -> None:
        """Probe the fabric path to every CUT rank each ``interval_s``; one that goes through
        brings the rank back for this source. Sleeps while no rank is CUT (an idle pod's ranks
        do not wake for it). Runs until cancelled (needs ``probe``)."""
        if self.probe is None:
            raise RuntimeError("watch_paths needs a probe")
        while True:
            if not self.health.cut:
                self._cut.clear()
                await self._cut.wait()
            await asyncio.sleep(interval_s)
            for r in sorted(self.health.cut):
                try:
                    await self.probe(r)
                except LinkDown:
                    continue
                except XcclError as exc:
                    log.info("dispatch.probe_failed", source=self.source, peer=self.expert_peers[r],
                             error=type(exc).__name__)
                    continue
                change = self.health.reachable(r)
                if change is not None:
                    self.stats["pair_heals"] += 1
                self._changed_to(change)

    async def _cut_by_fabric(self, ranks: Sequence[int]) -> list[int]:
        """Of ``ranks`` (no answer in time), those whose fabric path is refused now."""
        if self.probe is None:
            return []
        out = []
        for r in ranks:
            try:
                await self.probe(r)
            except LinkDown:
                out.append(r)
            except XcclError:
                pass
        return out

    def _rank_failed(self, rank: int, why: str) -> None:
        self.stats["rank_failures"] += 1
        self._changed_to(self.health.failed(rank, why))

    def _changed_to(self, change: RankChange | None) -> None:
        if change is None:
            return
        log.info("dispatch.expert_rank", source=self.source, peer=self.expert_peers[change.rank],
                 state=change.new.value, why=change.why)
        if self.chooser is not None and change.new is RankState.IN:
            self.chooser.forget(change.rank)
        self._changed.set()

    # -- layers -----------------------------------------------------------------------------
    def plan(self, event_id: int, topk_ids: np.ndarray) -> DispatchPlan:
        return plan_dispatch(event_id, self.source, topk_ids, self.placement, self.layout, self.health.excluded,
                             self.incarnation)

    async def run_layer(self, event_id: int, x: np.ndarray, topk_ids: np.ndarray, topk_w: np.ndarray, *,
                        timeout_s: float = 5.0) -> np.ndarray:
        pending = await self.start_layer(event_id, x, topk_ids, timeout_s=timeout_s)
        return await self.finish_layer(pending, topk_w)

    async def start_layer(self, event_id: int, x: np.ndarray, topk_ids: np.ndarray, *,
                          timeout_s: float = 5.0) -> PendingLayer:
        """A2E half: the rows are in the experts' windows when this returns. The caller may
        compute (e.g. the shared expert) before ``finish_layer``; the deadline keeps running.
        ``timeout_s`` bounds the layer without failover (with it, ``Failover`` does)."""
        if x.shape != (topk_ids.shape[0], self.layout.hidden):
            raise ValueError(f"shapes x {x.shape}, ids {topk_ids.shape} do not agree with hidden {self.layout.hidden}")
        attempts = LayerAttempts(event_id, self.source, topk_ids, self.placement, self.layout, self.incarnation,
                                 chooser=self.chooser)
        pending = PendingLayer(attempts, x, layer_deadline=time.monotonic() + timeout_s)
        await self._launch(pending)
        return pending

    async def finish_layer(self, pending: PendingLayer, topk_w: np.ndarray) -> np.ndarray:
        """E2A half: wait for every answer, re-dispatching a failed rank's rows, and combine."""
        att = pending.attempts
        if topk_w.shape != att.ids.shape:
            raise ValueError(f"weights {topk_w.shape} for a plan of {att.ids.shape[0]} x {att.ids.shape[1]}")
        while True:
            await self._collect(pending)
            if att.done:
                break
            if self.failover is None:   # a refusal (timeouts and put errors raised already)
                raise ExpertRefused("; ".join(f"{self.expert_peers[r]}: {w}" for r, w in att.failed.items()))
            self.stats["retries"] += 1
            log.warning("dispatch.redispatch", source=self.source, event_id=att.event_id,
                        failed={self.expert_peers[r]: w for r, w in att.failed.items()},
                        rows=int(att.missing_rows().size))
            await self._launch(pending)
        self.stats["layers"] += 1
        return att.result(topk_w)

    async def _launch(self, p: PendingLayer) -> None:
        """Plan the next attempt (waiting for a live replica if needed) and post its blocks."""
        while True:
            try:
                plan = p.attempts.next_plan(self.health.excluded)
                break
            except NoLiveReplica as exc:
                if self.failover is None:
                    raise
                if all(r in self.health.cut for r in exc.holders):
                    # Alive but unreachable from here: waiting would only stall this group's
                    # requests; failing them now lets their routers replay them elsewhere.
                    self.stats["cut_off"] += 1
                    raise ExpertCutOff(exc.expert_id, tuple(self.expert_peers[r] for r in exc.holders),
                                       getattr(self.ep, "name", f"source {self.source}")) from exc
                now = time.monotonic()
                if p.wait_deadline is None:
                    p.wait_deadline = now + self.failover.wait_s
                    self.stats["replica_waits"] += 1
                    log.warning("dispatch.wait_replica", source=self.source, expert=exc.expert_id,
                                holders=[self.expert_peers[r] for r in exc.holders], wait_s=self.failover.wait_s)
                if now >= p.wait_deadline:
                    self.stats["unavailable"] += 1
                    raise ExpertUnavailable(exc.expert_id, tuple(self.expert_peers[r] for r in exc.holders),
                                            self.failover.wait_s) from exc
                # No await since planning: no change can have been missed between it and clear().
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), p.wait_deadline - now)
                except TimeoutError:
                    pass
        now = time.monotonic()
        p.deadline = now + self.failover.answer_timeout_s if self.failover else p.layer_deadline
        p.posted_at = now
        errors = await self._post(plan, p.x, p.deadline)
        for r, exc in errors.items():
            why = f"put of event {plan.event_id} failed: {type(exc).__name__}: {exc}"
            p.attempts.rank_failed(r, why)
            if self.failover is None:
                raise exc
            if isinstance(exc, LinkDown):
                self._unreachable(r, why)
            else:
                self._rank_failed(r, why)

    async def _post(self, plan: DispatchPlan, x: np.ndarray, deadline: float) -> dict[int, XcclError]:
        """Put every rank's block concurrently; one failing peer never cancels the others (they
        would wait for a block that never comes). Returns the ranks whose put failed."""
        errors: dict[int, XcclError] = {}
        metas = [a2e_meta(plan, r, self.layout) for r in plan.ranks]
        puts = [PutSpec(self.expert_peers[r], self.windows.a2e, meta.offset, _flat_bytes(pack_rows(x, plan, r)),
                        encode_meta(meta)) for r, meta in zip(plan.ranks, metas)]
        for meta in metas:
            self.stats["rows_sent"] += meta.count
        results = await self.ep.put_many(puts, timeout_s=max(_remaining(deadline), 1e-3))
        for r, meta, err in zip(plan.ranks, metas, results):
            if err is None:
                self.rows_to[r] += meta.count
            elif isinstance(err, _RANK_ERRORS):
                errors[r] = err
            else:
                raise err
        return dict(sorted(errors.items()))

    async def _collect(self, p: PendingLayer) -> None:
        """Until every rank of the current attempt answered or failed (deadline, refusal)."""
        att = p.attempts
        while att.waiting():
            try:
                note = await _next_notice(self.ep, p.deadline, f"E2A of event {att.event_id} from expert ranks "
                                          f"{att.waiting()}")
            except CorruptMetadata as exc:   # an undecodable notice: nobody to blame, drop it
                if self.failover is None:
                    raise
                self.stats["bad_notices"] += 1
                log.warning("dispatch.bad_answer", src=None, error=type(exc).__name__, detail=str(exc))
                continue
            except XcclTimeout:
                if self.failover is None:
                    raise
                silent = att.waiting()
                cut = await self._cut_by_fabric(silent)
                for r in silent:
                    why = f"no answer to event {att.event_id} within {self.failover.answer_timeout_s:g} s"
                    att.rank_failed(r, why)
                    if r in cut:   # the answer could not cross the fabric: this pair only
                        self._unreachable(r, why + " (fabric path refused)")
                    else:
                        self._rank_failed(r, why)
                return
            meta = note.meta
            try:
                if note.window != self.windows.e2a:
                    raise CorruptMetadata(f"{note.src} notified window {note.window!r}, expected {self.windows.e2a!r}")
                if not 0 <= meta.sender < len(self.expert_peers) or self.expert_peers[meta.sender] != note.src:
                    raise CorruptMetadata(f"{note.src} claims to be expert rank {meta.sender}")
                verdict = att.accept(meta, note.nbytes)
            except ProtocolError as exc:
                if self.failover is None:
                    raise
                self.stats["bad_notices"] += 1
                log.warning("dispatch.bad_answer", src=note.src, error=type(exc).__name__, detail=str(exc))
                if note.src in self.expert_peers:   # a rank that breaks the protocol fails for the step
                    r = self.expert_peers.index(note.src)
                    att.rank_failed(r, f"bad answer: {type(exc).__name__}: {exc}")
                    self._rank_failed(r, f"bad answer: {exc}")
                continue
            if verdict is Verdict.STALE:
                # An answer to an abandoned attempt, a previous incarnation of this source, or a
                # rank given up on: its block is rewritten before any answer we read from that
                # rank (a rank answers a source in order), so dropping it is safe.
                self.stats["stale_notices"] += 1
                log.warning("dispatch.stale_notice", src=note.src, event_id=meta.event_id, current=att.event_id)
            elif verdict is Verdict.REFUSED:
                self.stats["refusals"] += 1
                log.warning("dispatch.refused", src=note.src, event_id=meta.event_id, error=meta.error)
                if self.failover is not None:
                    self._rank_failed(meta.sender, f"refused event {meta.event_id}: {meta.error}")
            else:
                if self.chooser is not None:
                    self.chooser.observe(meta.sender, max(0.0, time.monotonic() - p.posted_at))
                view = self.ep.window(self.windows.e2a)
                rows = view[meta.offset:meta.offset + meta.count * self.layout.row_bytes].view(DTYPE)
                att.fill(meta.sender, rows.reshape(meta.count, self.layout.hidden))


@dataclass(frozen=True, slots=True)
class Served:
    """What one ``serve_event`` call did: answered ``source``'s event with ``rows`` rows."""

    source: int
    event_id: int
    rows: int


class E2AHandler:
    """Expert-rank side: ``serve_event`` answers the next A2E block, whichever source sent it.

    Bad metadata from a peer raises a typed ``ProtocolError`` and consumes only that notice
    (nothing else is held between calls), so a serving loop can log it and call
    ``serve_event`` again. A replayed or late block (not newer than the last one served for
    that source) is ``EventIdMismatch``.
    """

    def __init__(self, ep: Any, *, rank: int, source_peers: Sequence[str], placement: Placement,
                 layout: DispatchLayout, windows: DispatchWindows = DispatchWindows()) -> None:
        if len(source_peers) != layout.num_sources:
            raise ValueError(f"{len(source_peers)} source peers for {layout.num_sources} sources")
        self.ep = ep
        self.rank = rank
        self.source_peers = tuple(source_peers)
        self.placement = placement
        self.layout = layout
        self.windows = windows
        self.hosted = placement.hosted(rank)
        self._guard = SourceGuard(layout, self.hosted)
        self.stats = {"events": 0, "rows_served": 0, "rejected_notices": 0, "refusals_sent": 0, "delayed_blocks": 0,
                      # serve_events: blocks served along with others, and computed with another of their layer
                      "batched_blocks": 0, "merged_blocks": 0}
        # A straggler (admin ``SetStraggler``): every answered block waits this long first.
        self.delay_s = 0.0
        # source index -> [events, rows] served for it.
        self.per_source: list[list[int]] = [[0, 0] for _ in range(layout.num_sources)]

    async def serve_event(self, expert_fn: ExpertFn | None = None, *, timeout_s: float = 5.0,
                          select: Callable[[int], ExpertFn] | None = None,
                          answer_timeout_s: float | None = None) -> Served:
        """Wait for the next A2E block (bounded by ``timeout_s``), compute it, answer its source.

        Give ``expert_fn``, or ``select(event_id) -> expert_fn`` when the experts depend on the
        event (the MoE layer); ``select`` raises a ``ProtocolError`` for an event it cannot serve.
        The answer's put has ``answer_timeout_s`` of its own (default: what is left of
        ``timeout_s``), so a serving loop may poll with short waits without starving answers.
        """
        if (expert_fn is None) == (select is None):
            raise ValueError("give exactly one of expert_fn and select")
        deadline = time.monotonic() + timeout_s
        try:
            note = await _next_notice(self.ep, deadline, "an A2E block from any source")
        except CorruptMetadata as exc:  # undecodable notify
            self._rejected(exc, src=None)
            raise
        try:
            meta, fn = self._accept(note, select or (lambda _event_id: expert_fn))
        except ProtocolError as exc:
            await self._refuse(note, exc, deadline, answer_timeout_s)
            raise
        view = self.ep.window(self.windows.a2e)
        h, rb = self.layout.hidden, self.layout.row_bytes
        rows = view[meta.offset:meta.offset + meta.count * rb].view(DTYPE).reshape(meta.count, h)
        y = run_block(rows, meta.expert_ids, fn, h)
        if self.delay_s > 0:
            self.stats["delayed_blocks"] += 1
            await asyncio.sleep(self.delay_s)
        answer = e2a_meta(meta.event_id, self.rank, y.shape[0], self.layout, meta.incarnation)
        put_timeout_s = max(_remaining(deadline), 1e-3) if answer_timeout_s is None else answer_timeout_s
        (err,) = await self.ep.put_many([PutSpec(self.source_peers[meta.sender], self.windows.e2a, answer.offset,
                                                 _flat_bytes(y), encode_meta(answer))], timeout_s=put_timeout_s)
        if err is not None:
            raise err
        self._answered(meta.sender, answer.count)
        return Served(source=meta.sender, event_id=meta.event_id, rows=answer.count)

    def _accept(self, note: Notice, select: Callable[[int], ExpertFn]) -> tuple[BlockMeta, ExpertFn]:
        meta = note.meta
        try:
            if note.window != self.windows.a2e:
                raise CorruptMetadata(f"{note.src} notified window {note.window!r}, expected {self.windows.a2e!r}")
            if not 0 <= meta.sender < len(self.source_peers) or self.source_peers[meta.sender] != note.src:
                raise CorruptMetadata(f"{note.src} claims to be source {meta.sender}")
            fn = select(meta.event_id)
            self._guard.accept(meta, note.nbytes)
        except ProtocolError as exc:
            self._rejected(exc, src=note.src)
            raise
        return meta, fn

    async def serve_events(self, *, select: Callable[[int], ExpertFn], timeout_s: float = 5.0,
                           answer_timeout_s: float | None = None, max_blocks: int = 16) -> list[Served]:
        """``serve_event`` for every block that waits: the next one (bounded by ``timeout_s``)
        and those already here with it (up to ``max_blocks``). The blocks of one MoE layer --
        from different sources (DP groups), which never wait for each other -- run each expert
        once on all their rows (``run_blocks``: a row's bits do not depend on its companions),
        and their answers leave together in one ``put_many``, layer by layer, so no source's
        answer waits for another layer's compute. A bad notice is rejected (and refused, when
        its source is known) as ``serve_event`` does, without failing the others; an answer
        that cannot be delivered is logged and costs only its source.
        """
        if self.delay_s > 0:   # a straggler answers block by block, each after its delay
            try:
                return [await self.serve_event(select=select, timeout_s=timeout_s, answer_timeout_s=answer_timeout_s)]
            except ProtocolError:
                return []
        deadline = time.monotonic() + timeout_s
        raws: list[Notification] = []
        left = _remaining(deadline)
        if left <= 0:
            raise XcclTimeout("timed out waiting for an A2E block from any source")
        try:
            raws.append(await self.ep.recv_notify(timeout_s=left))
        except XcclTimeout as exc:
            raise XcclTimeout("timed out waiting for an A2E block from any source") from exc
        while len(raws) < max_blocks and (more := self.ep.poll_notify()) is not None:
            raws.append(more)
        put_timeout_s = max(_remaining(deadline), 1e-3) if answer_timeout_s is None else answer_timeout_s
        layers: dict[int, list[tuple[BlockMeta, ExpertFn]]] = {}
        refusals: list[PutSpec] = []
        for raw in raws:
            src, window, _offset, nbytes, notify = raw
            try:
                note = Notice(src=src, window=window, nbytes=nbytes, meta=decode_meta(notify))
            except CorruptMetadata as exc:   # undecodable: nobody to answer
                self._rejected(exc, src=None)
                continue
            try:
                meta, fn = self._accept(note, select)
            except ProtocolError as exc:
                refusal = self._refusal(note, exc)
                if refusal is not None:
                    refusals.append(refusal)
                continue
            layers.setdefault(unpack_event_id(meta.event_id)[0], []).append((meta, fn))
        if refusals:
            for spec, err in zip(refusals, await self.ep.put_many(refusals, timeout_s=put_timeout_s)):
                self._refusal_sent(spec.peer, err)
        view = self.ep.window(self.windows.a2e)
        h, rb = self.layout.hidden, self.layout.row_bytes
        served: list[Served] = []
        if len(raws) > 1:
            self.stats["batched_blocks"] += sum(len(g) for g in layers.values())
        for group in layers.values():
            if len(group) > 1:
                self.stats["merged_blocks"] += len(group)
            blocks = [(view[m.offset:m.offset + m.count * rb].view(DTYPE).reshape(m.count, h), m.expert_ids)
                      for m, _fn in group]
            ys = run_blocks(blocks, group[0][1], h)
            answers = [e2a_meta(m.event_id, self.rank, y.shape[0], self.layout, m.incarnation)
                       for (m, _fn), y in zip(group, ys)]
            puts = [PutSpec(self.source_peers[m.sender], self.windows.e2a, a.offset, _flat_bytes(y), encode_meta(a))
                    for (m, _fn), a, y in zip(group, answers, ys)]
            for (m, _fn), a, err in zip(group, answers, await self.ep.put_many(puts, timeout_s=put_timeout_s)):
                if err is not None:
                    # The source died or its window is gone: only its answer is lost.
                    log.warning("dispatch.answer_failed", rank=self.rank, src=self.source_peers[m.sender],
                                event_id=m.event_id, error=type(err).__name__, detail=str(err))
                    continue
                self._answered(m.sender, a.count)
                served.append(Served(source=m.sender, event_id=m.event_id, rows=a.count))
        return served

    def _answered(self, sender: int, rows: int) -> None:
        self.stats["events"] += 1
        self.stats["rows_served"] += rows
        self.per_source[sender][0] += 1
        self.per_source[sender][1] += rows

    def _refusal(self, note: Notice, exc: ProtocolError) -> PutSpec | None:
        """The typed refusal (no rows) of a block this rank cannot serve, so its source
        re-dispatches the rows to a replica now instead of waiting for its deadline. Only when
        the notice names a source that really sent it: an impostor gets no answer (None)."""
        meta = note.meta
        if not 0 <= meta.sender < len(self.source_peers) or self.source_peers[meta.sender] != note.src:
            return None
        answer = e2a_meta(meta.event_id, self.rank, 0, self.layout, meta.incarnation,
                          error=f"{type(exc).__name__}: {exc}")
        return PutSpec(note.src, self.windows.e2a, answer.offset, b"", encode_meta(answer))

    def _refusal_sent(self, src: str, err: XcclError | None) -> None:
        if err is not None:
            log.warning("dispatch.refusal_failed", rank=self.rank, src=src, error=type(err).__name__)
            return
        self.stats["refusals_sent"] += 1

    async def _refuse(self, note: Notice, exc: ProtocolError, deadline: float, answer_timeout_s: float | None) -> None:
        refusal = self._refusal(note, exc)
        if refusal is None:
            return
        timeout_s = max(_remaining(deadline), 1e-3) if answer_timeout_s is None else answer_timeout_s
        (err,) = await self.ep.put_many([refusal], timeout_s=timeout_s)
        self._refusal_sent(note.src, err)

    def _rejected(self, exc: ProtocolError, src: str | None) -> None:
        self.stats["rejected_notices"] += 1
        log.warning("dispatch.notice_rejected", rank=self.rank, src=src, error=type(exc).__name__, detail=str(exc))
