"""MoE dispatch (A2E) and combine (E2A) over XCCL endpoints: the thin async shell of
``xccl_net.dispatch_core``.

- ``A2EDispatcher`` (attention rank ``source``): one put+notify per live expert rank into that
  rank's "a2e" block for this source, then waits for every rank's E2A answer in its own "e2a"
  window and applies the gate weights.
- ``E2AHandler`` (expert rank ``rank``): waits for every source's A2E block of one event, runs
  the experts, answers each source with one put+notify into its "e2a" block.

Each object owns its endpoint's notify stream (``recv_notify``): do not share an endpoint's
notifications with another consumer. Every wait is bounded by the caller's ``timeout_s``:
a missing peer is ``XcclTimeout`` naming who is missing, a dead one ``PeerUnreachable``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
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
    ExpertEventCollector,
    ExpertFn,
    Placement,
    a2e_meta,
    combine,
    decode_meta,
    e2a_meta,
    encode_meta,
    pack_rows,
    plan_dispatch,
    run_experts,
)
from xccl_net.errors import CorruptMetadata, EventIdMismatch, ProtocolError, XcclError, XcclTimeout

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


class A2EDispatcher:
    """Attention-rank side: ``run_layer`` = dispatch, wait for the experts, combine."""

    def __init__(self, ep: Any, *, source: int, expert_peers: Sequence[str], placement: Placement,
                 layout: DispatchLayout, windows: DispatchWindows = DispatchWindows()) -> None:
        if len(expert_peers) != layout.num_ranks:
            raise ValueError(f"{len(expert_peers)} expert peers for {layout.num_ranks} ranks")
        self.ep = ep
        self.source = source
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
        return plan_dispatch(event_id, self.source, topk_ids, self.placement, self.layout, self.excluded)

    async def run_layer(self, event_id: int, x: np.ndarray, topk_ids: np.ndarray, topk_w: np.ndarray, *,
                        timeout_s: float = 5.0) -> np.ndarray:
        deadline = time.monotonic() + timeout_s
        if x.shape != (topk_ids.shape[0], self.layout.hidden) or topk_w.shape != topk_ids.shape:
            raise ValueError(f"shapes x {x.shape}, ids {topk_ids.shape}, w {topk_w.shape} do not agree "
                             f"with hidden {self.layout.hidden}")
        plan = self.plan(event_id, topk_ids)
        await self._dispatch(plan, x, deadline)
        outputs = await self._collect(plan, deadline)
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
            if meta.event_id < plan.event_id:
                # An answer to an abandoned earlier attempt: its block is rewritten before
                # the current answer's notify (a rank answers in order), so dropping is safe.
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


class E2AHandler:
    """Expert-rank side: ``serve_event`` handles one event from every source.

    Bad metadata from a peer raises a typed ``ProtocolError`` and consumes only that notice,
    so a serving loop can log it and call ``serve_event`` again. A notice for a newer event
    while one is being collected means the sources abandoned the current one: it raises
    ``EventIdMismatch`` and the newer notice is kept for the next call (nothing is lost).
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
        self.last_event_id: int | None = None
        # At most one newer notice is parked per abandoned event; bounded all the same.
        self._pending: deque[Notice] = deque(maxlen=layout.num_sources)
        self._coll: ExpertEventCollector | None = None
        self.stats = {"events": 0, "rows_served": 0, "rejected_notices": 0}

    async def serve_event(self, expert_fn: ExpertFn, *, timeout_s: float = 5.0) -> int:
        """Process one event; returns its id.

        The collector survives a raised error, so blocks already accepted are not lost when
        one bad or stale notice is rejected, or when the wait times out.
        """
        deadline = time.monotonic() + timeout_s
        if self._coll is None:
            self._coll = ExpertEventCollector(self.layout, self.hosted, last_event_id=self.last_event_id)
        coll = self._coll
        while not coll.done:
            if self._pending:
                note = self._pending.popleft()
            else:
                waiting = f"A2E of sources {coll.missing()}" + (
                    f" for event {coll.event_id}" if coll.event_id is not None else "")
                try:
                    note = await _next_notice(self.ep, deadline, waiting)
                except CorruptMetadata as exc:  # undecodable notify
                    self._rejected(exc, src=None)
                    raise
            self._accept(coll, note)
        self._coll = None
        event_id = coll.event_id
        assert event_id is not None  # done implies at least one block
        self.last_event_id = event_id
        view = self.ep.window(self.windows.a2e)
        h, rb = self.layout.hidden, self.layout.row_bytes
        blocks = {s: (view[m.offset:m.offset + m.count * rb].view(DTYPE).reshape(m.count, h), m.expert_ids)
                  for s, m in coll.blocks.items()}
        outs = run_experts(blocks, expert_fn, h)
        ops = []
        for s, y in outs.items():
            meta = e2a_meta(event_id, self.rank, y.shape[0], self.layout)
            self.stats["rows_served"] += meta.count
            ops.append(partial(self.ep.put, self.source_peers[s], self.windows.e2a, meta.offset, _flat_bytes(y),
                               notify=encode_meta(meta), timeout_s=max(_remaining(deadline), 1e-3)))
        await _all(ops)
        self.stats["events"] += 1
        return event_id

    def _accept(self, coll: ExpertEventCollector, note: Notice) -> None:
        meta = note.meta
        try:
            if note.window != self.windows.a2e:
                raise CorruptMetadata(f"{note.src} notified window {note.window!r}, expected {self.windows.a2e!r}")
            if not 0 <= meta.sender < len(self.source_peers) or self.source_peers[meta.sender] != note.src:
                raise CorruptMetadata(f"{note.src} claims to be source {meta.sender}")
            if coll.event_id is not None and meta.event_id > coll.event_id:
                # Sources only move on after every rank answered, so a newer event means the
                # current one was abandoned (a source gave up on it): drop it, keep the newer.
                self._pending.append(note)
                self.last_event_id = coll.event_id
                self._coll = None
                raise EventIdMismatch(f"event {coll.event_id} abandoned: source {meta.sender} moved on to "
                                      f"event {meta.event_id} (missing {coll.missing()})")
            coll.add(meta, note.nbytes)
        except ProtocolError as exc:
            self._rejected(exc, src=note.src)
            raise

    def _rejected(self, exc: ProtocolError, src: str | None) -> None:
        self.stats["rejected_notices"] += 1
        log.warning("dispatch.notice_rejected", rank=self.rank, src=src, error=type(exc).__name__, detail=str(exc))
