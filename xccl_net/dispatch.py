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
a missing peer is ``XcclTimeout`` naming who is missing, a dead one ``PeerUnreachable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.logging import get_logger
from xccl_net.dispatch_core import (
    DTYPE,
    BlockMeta,
    CombineCollector,
    DispatchLayout,
    DispatchPlan,
    ExpertFn,
    Placement,
    SourceGuard,
    a2e_meta,
    combine,
    decode_meta,
    e2a_meta,
    encode_meta,
    pack_rows,
    plan_dispatch,
    run_block,
)
from xccl_net.errors import CorruptMetadata, ProtocolError, XcclError, XcclTimeout

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


async def _all(ops: Sequence[Callable[[], Awaitable[Any]]]) -> None:
    """Run ``ops`` concurrently to completion; then raise the first XCCL error, if any.

    One failing peer must not cancel the writes to the healthy ones (they would be left
    waiting for a block that never comes). Ops are thunks so that nothing is started when
    building the list fails half-way.
    """
    errors: list[XcclError] = []

    async def one(op: Callable[[], Awaitable[Any]]) -> None:
        try:
            await op()
        except XcclError as exc:
            errors.append(exc)

    async with asyncio.TaskGroup() as tg:
        for op in ops:
            tg.create_task(one(op))
    if errors:
        raise errors[0]


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
class PendingLayer:
    """A dispatched layer waiting for its E2A answers."""

    plan: DispatchPlan
    deadline: float


class A2EDispatcher:
    """Attention-rank side: ``run_layer`` = dispatch, wait for the experts, combine.

    Event ids are this source's own (increasing); ``incarnation`` must grow across restarts of
    the source (default: the wall clock in ns at construction) so the experts take a restarted
    source's fresh small ids as new, not stale.
    """

    def __init__(self, ep: Any, *, source: int, expert_peers: Sequence[str], placement: Placement,
                 layout: DispatchLayout, windows: DispatchWindows = DispatchWindows(),
                 incarnation: int | None = None) -> None:
        if len(expert_peers) != layout.num_ranks:
            raise ValueError(f"{len(expert_peers)} expert peers for {layout.num_ranks} ranks")
        self.ep = ep
        self.source = source
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        self.expert_peers = tuple(expert_peers)
        self.placement = placement
        self.layout = layout
        self.windows = windows
        self.excluded: set[int] = set()
        self.stats = {"layers": 0, "stale_notices": 0, "rows_sent": 0}

    def exclude(self, rank: int) -> None:
        """Stop dispatching to ``rank``: its experts are served by their next replica."""
        self.excluded.add(rank)

    def include(self, rank: int) -> None:
        self.excluded.discard(rank)

    def plan(self, event_id: int, topk_ids: np.ndarray) -> DispatchPlan:
        return plan_dispatch(event_id, self.source, topk_ids, self.placement, self.layout, self.excluded,
                             self.incarnation)

    async def run_layer(self, event_id: int, x: np.ndarray, topk_ids: np.ndarray, topk_w: np.ndarray, *,
                        timeout_s: float = 5.0) -> np.ndarray:
        pending = await self.start_layer(event_id, x, topk_ids, timeout_s=timeout_s)
        return await self.finish_layer(pending, topk_w)

    async def start_layer(self, event_id: int, x: np.ndarray, topk_ids: np.ndarray, *,
                          timeout_s: float = 5.0) -> PendingLayer:
        """A2E half: the rows are in the experts' windows when this returns. The caller may
        compute (e.g. the shared expert) before ``finish_layer``; the deadline keeps running."""
        deadline = time.monotonic() + timeout_s
        if x.shape != (topk_ids.shape[0], self.layout.hidden):
            raise ValueError(f"shapes x {x.shape}, ids {topk_ids.shape} do not agree with hidden {self.layout.hidden}")
        plan = self.plan(event_id, topk_ids)
        await self._dispatch(plan, x, deadline)
        return PendingLayer(plan, deadline)

    async def finish_layer(self, pending: PendingLayer, topk_w: np.ndarray) -> np.ndarray:
        """E2A half: wait for every answer (until the layer's deadline) and combine."""
        plan = pending.plan
        if topk_w.shape != (plan.num_tokens, plan.top_k):
            raise ValueError(f"weights {topk_w.shape} for a plan of {plan.num_tokens} x {plan.top_k}")
        outputs = await self._collect(plan, pending.deadline)
        self.stats["layers"] += 1
        return combine(plan, outputs, topk_w, self.layout.hidden)

    async def _dispatch(self, plan: DispatchPlan, x: np.ndarray, deadline: float) -> None:
        ops = []
        for r in plan.ranks:
            rows = pack_rows(x, plan, r)
            meta = a2e_meta(plan, r, self.layout)
            self.stats["rows_sent"] += meta.count
            ops.append(partial(self.ep.put, self.expert_peers[r], self.windows.a2e, meta.offset, _flat_bytes(rows),
                               notify=encode_meta(meta), timeout_s=max(_remaining(deadline), 1e-3)))
        await _all(ops)

    async def _collect(self, plan: DispatchPlan, deadline: float) -> dict[int, np.ndarray]:
        coll = CombineCollector(plan, self.layout)
        while not coll.done:
            note = await _next_notice(self.ep, deadline, f"E2A of event {plan.event_id} from expert ranks "
                                      f"{coll.missing()}")
            meta = note.meta
            if meta.incarnation != self.incarnation or meta.event_id < plan.event_id:
                # An answer to an abandoned earlier attempt (or to a previous incarnation of
                # this source): its block is rewritten before the current answer's notify (a
                # rank answers a source in order), so dropping is safe.
                self.stats["stale_notices"] += 1
                log.warning("dispatch.stale_notice", src=note.src, event_id=meta.event_id, current=plan.event_id)
                continue
            if note.window != self.windows.e2a:
                raise CorruptMetadata(f"{note.src} notified window {note.window!r}, expected {self.windows.e2a!r}")
            if not 0 <= meta.sender < len(self.expert_peers) or self.expert_peers[meta.sender] != note.src:
                raise CorruptMetadata(f"{note.src} claims to be expert rank {meta.sender}")
            coll.add(meta, note.nbytes)
        view = self.ep.window(self.windows.e2a)
        h = self.layout.hidden
        return {r: view[m.offset:m.offset + m.count * self.layout.row_bytes].view(DTYPE).reshape(m.count, h)
                for r, m in coll.blocks.items()}


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
        self.stats = {"events": 0, "rows_served": 0, "rejected_notices": 0}
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
        meta, fn = self._accept(note, select or (lambda _event_id: expert_fn))
        view = self.ep.window(self.windows.a2e)
        h, rb = self.layout.hidden, self.layout.row_bytes
        rows = view[meta.offset:meta.offset + meta.count * rb].view(DTYPE).reshape(meta.count, h)
        y = run_block(rows, meta.expert_ids, fn, h)
        answer = e2a_meta(meta.event_id, self.rank, y.shape[0], self.layout, meta.incarnation)
        put_timeout_s = max(_remaining(deadline), 1e-3) if answer_timeout_s is None else answer_timeout_s
        await self.ep.put(self.source_peers[meta.sender], self.windows.e2a, answer.offset, _flat_bytes(y),
                          notify=encode_meta(answer), timeout_s=put_timeout_s)
        self.stats["events"] += 1
        self.stats["rows_served"] += answer.count
        self.per_source[meta.sender][0] += 1
        self.per_source[meta.sender][1] += answer.count
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

    def _rejected(self, exc: ProtocolError, src: str | None) -> None:
        self.stats["rejected_notices"] += 1
        log.warning("dispatch.notice_rejected", rank=self.rank, src=src, error=type(exc).__name__, detail=str(exc))
