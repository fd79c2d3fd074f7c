"""Pure core of MoE token dispatch (A2E) and combine (E2A): planning, packing, combine math.

No I/O and no asyncio: ``xccl_net.dispatch`` pumps these decisions over XCCL endpoints.

Layout (all sizes in rows of ``hidden`` float32 values):
- expert rank ``r`` owns an "a2e" window of ``num_sources`` blocks; block ``s`` (at
  ``layout.a2e_offset(s)``) is written only by attention rank ``s``, with ONE put per event;
- attention rank ``s`` owns an "e2a" window of ``num_ranks`` blocks; block ``r`` is written
  only by expert rank ``r``.
A block holds at most ``capacity_rows`` rows. A row is one (token, top-k slot) pair, so a
token choosing two experts on the same rank is sent twice: the expert side stays a pure
row-wise gather, at the cost of duplicate bytes when k experts share a rank.

Sources are independent (DP groups share nothing but the experts): an expert rank answers
each source's block as soon as it arrives, never waiting for other sources. An event is
(source, event id); each source numbers its own events (``pack_event_id`` of its own steps),
and ``incarnation`` (chosen by the source at start, increasing across restarts) keeps a
restarted source's small ids from looking stale.

Row order is canonical, which is what makes results bitwise independent of placement:
- inside a block, rows are sorted by (expert id, token, slot);
- an expert computes on that source's rows for it, in that order (``run_block``), exactly
  what ``reference_moe`` does without any transport; a row's result must not depend on its
  companions across sources (``layers.linear`` computes in fixed row tiles for that reason,
  so answering per source is bitwise equal to a whole-batch computation too);
- the combine adds the k contributions in slot order j = 0..k-1 (``weighted_sum``).

Single buffering is safe because each layer is a strict round trip per source: a source
writes its a2e block for event e+1 only after every expert rank answered its event e, and an
expert rank answers only after it has consumed that block.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from services.common.wire import FieldError
from xccl_net.errors import CorruptMetadata, EventIdMismatch, PeerUnreachable, ProtocolError, WindowError

if TYPE_CHECKING:
    from xccl_net.replica_choice import ReplicaChooser

DTYPE = np.dtype(np.float32)
ID_DTYPE = np.dtype(np.int32)

ExpertFn = Callable[[int, np.ndarray], np.ndarray]


class DispatchCapacityError(WindowError):
    """More rows for one (source, destination) block than ``capacity_rows``: raised at the sender."""

    def __init__(self, message: str, *, rows: int, capacity_rows: int) -> None:
        super().__init__(message)
        self.rows = rows
        self.capacity_rows = capacity_rows


class NoLiveReplica(PeerUnreachable):
    """Every rank holding an expert is excluded: the layer cannot run (names the expert)."""

    def __init__(self, expert_id: int, holders: Sequence[int]) -> None:
        super().__init__(f"no live replica of expert {expert_id} (holders {list(holders)} all excluded)")
        self.expert_id = expert_id
        self.holders = tuple(holders)


# ---------------------------------------------------------------- static configuration


@dataclass(frozen=True, slots=True)
class Placement:
    """Which expert ranks hold each routed expert; ``holders[e][0]`` is the primary."""

    holders: tuple[tuple[int, ...], ...]
    num_ranks: int

    def __post_init__(self) -> None:
        for e, hs in enumerate(self.holders):
            if not hs:
                raise ValueError(f"expert {e} has no holder")
            if len(set(hs)) != len(hs):
                raise ValueError(f"expert {e} lists a holder twice: {hs}")
            for r in hs:
                if not 0 <= r < self.num_ranks:
                    raise ValueError(f"expert {e} holder {r} outside 0..{self.num_ranks - 1}")

    @classmethod
    def round_robin(cls, num_experts: int, num_ranks: int, replicas: int = 2) -> Placement:
        """Expert e on ranks e, e+1, ... (mod N): every expert has ``replicas`` distinct holders."""
        if replicas > num_ranks:
            raise ValueError(f"{replicas} replicas need at least as many ranks, got {num_ranks}")
        holders = tuple(tuple((e + i) % num_ranks for i in range(replicas)) for e in range(num_experts))
        return cls(holders=holders, num_ranks=num_ranks)

    @property
    def num_experts(self) -> int:
        return len(self.holders)

    def hosted(self, rank: int) -> frozenset[int]:
        """Experts whose weights live on ``rank`` (as primary or replica)."""
        return frozenset(e for e, hs in enumerate(self.holders) if rank in hs)

    def choose(self, excluded: Iterable[int] = (), needed: Iterable[int] | None = None) -> np.ndarray:
        """Expert id -> the rank serving it: the first holder not excluded (deterministic).

        Only experts in ``needed`` (default: all) must have a live holder; the others map to
        -1 when none is left, so an expert nobody routes to never blocks a layer.
        """
        ex = frozenset(excluded)
        want = None if needed is None else frozenset(int(e) for e in needed)
        out = np.full(self.num_experts, -1, dtype=np.int64)
        for e, hs in enumerate(self.holders):
            live = [r for r in hs if r not in ex]
            if live:
                out[e] = live[0]
            elif want is None or e in want:
                raise NoLiveReplica(e, hs)
        return out


@dataclass(frozen=True, slots=True)
class DispatchLayout:
    """Window geometry shared by every rank of one dispatch group."""

    num_sources: int
    num_ranks: int
    capacity_rows: int
    hidden: int

    def __post_init__(self) -> None:
        for name in ("num_sources", "num_ranks", "capacity_rows", "hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DispatchLayout.{name} must be positive, got {getattr(self, name)}")

    @property
    def row_bytes(self) -> int:
        return self.hidden * DTYPE.itemsize

    @property
    def block_bytes(self) -> int:
        return self.capacity_rows * self.row_bytes

    @property
    def a2e_window_bytes(self) -> int:
        return self.num_sources * self.block_bytes

    @property
    def e2a_window_bytes(self) -> int:
        return self.num_ranks * self.block_bytes

    def a2e_offset(self, source: int) -> int:
        return source * self.block_bytes

    def e2a_offset(self, rank: int) -> int:
        return rank * self.block_bytes


def pack_event_id(layer: int, step: int, attempt: int = 0) -> int:
    """(step, layer, attempt) -> one int, increasing in the order layers are dispatched.

    ``attempt`` lets a retried layer use a fresh, larger id so late answers to the
    abandoned attempt are recognisably stale.
    """
    if not 0 <= layer < (1 << 16) or not 0 <= attempt < (1 << 8) or step < 0:
        raise ValueError(f"layer {layer} / step {step} / attempt {attempt} out of range")
    return (step << 24) | (layer << 8) | attempt


def unpack_event_id(event_id: int) -> tuple[int, int, int]:
    """The inverse of ``pack_event_id``: (layer, step, attempt)."""
    if event_id < 0:
        raise ValueError(f"event id {event_id} is negative")
    return (event_id >> 8) & 0xFFFF, event_id >> 24, event_id & 0xFF


# ---------------------------------------------------------------- metadata (the notify payload)


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a put's notify says about the block it wrote.

    A2E: ``expert_ids`` holds one id per row. E2A: ``expert_ids`` is empty (the source
    knows its own plan). ``sender`` is the sender's index (source index or expert rank).
    ``incarnation`` is the source's (an E2A answer echoes the one of the block it answers).
    An E2A ``error`` is a refusal: the rank could not serve the block (its rows must go to a
    replica); such an answer carries no rows.
    """

    event_id: int
    sender: int
    offset: int
    count: int
    expert_ids: npt.NDArray[np.int32] = field(default_factory=lambda: np.empty(0, dtype=ID_DTYPE))
    incarnation: int = 0
    error: str = ""   # E2A only: the expert rank refuses the event (count 0); says why


# The notify payload is on the hot path (two per expert rank per MoE layer), so it has its
# own fixed little-endian layout instead of the generic wire codec (~5x cheaper both ways):
# tag "XB1", event_id u64, sender i32, offset u64, count u32, incarnation u64, error length u16,
# id count u32, then the ids (int32) and the error (UTF-8).
_META = struct.Struct("<3sQiQIQHI")
_META_TAG = b"XB1"
_MAX_ERROR = 4096


def encode_meta(meta: BlockMeta) -> bytes:
    """The notify payload of a block (a notify is a single byte string)."""
    ids = meta.expert_ids
    if not isinstance(ids, np.ndarray) or ids.dtype != ID_DTYPE or ids.ndim != 1:
        raise FieldError(f"BlockMeta.expert_ids must be a 1-D {ID_DTYPE} array, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)}")
    err = meta.error.encode()[:_MAX_ERROR].decode(errors="ignore").encode()   # whole characters
    try:
        head = _META.pack(_META_TAG, meta.event_id, meta.sender, meta.offset, meta.count, meta.incarnation,
                          len(err), ids.size)
    except struct.error as exc:
        raise FieldError(f"BlockMeta field out of range: {exc}") from None
    return b"".join((head, ids.tobytes(), err))


def decode_meta(buf: bytes | memoryview) -> BlockMeta:
    """Peer input: anything that is not a well-formed ``BlockMeta`` is ``CorruptMetadata``."""
    buf = bytes(buf)
    if len(buf) < _META.size or buf[:3] != _META_TAG:
        raise CorruptMetadata(f"undecodable dispatch notify: {len(buf)} bytes without the block header")
    _tag, event_id, sender, offset, count, incarnation, n_err, n_ids = _META.unpack_from(buf)
    end = _META.size + 4 * n_ids
    if end + n_err != len(buf):
        raise CorruptMetadata(f"undecodable dispatch notify: {len(buf)} bytes for {n_ids} ids and a "
                              f"{n_err}-byte error")
    try:
        error = buf[end:].decode()
    except UnicodeDecodeError as exc:
        raise CorruptMetadata(f"undecodable dispatch notify: error text is not UTF-8 ({exc})") from None
    ids = np.frombuffer(buf, dtype=ID_DTYPE, count=n_ids, offset=_META.size)
    return BlockMeta(event_id, sender, offset, count, ids, incarnation, error)


def _check_common(meta: BlockMeta, *, event_id: int, senders: int, offset_of: Callable[[int], int],
                  capacity_rows: int, nbytes: int | None, row_bytes: int) -> None:
    if meta.event_id != event_id:
        raise EventIdMismatch(f"expected event {event_id}, got {meta.event_id} from sender {meta.sender}")
    if not 0 <= meta.sender < senders:
        raise CorruptMetadata(f"sender index {meta.sender} outside 0..{senders - 1}")
    if meta.offset != offset_of(meta.sender):
        raise CorruptMetadata(f"sender {meta.sender} wrote at offset {meta.offset}, "
                              f"its block is at {offset_of(meta.sender)}")
    if not 0 <= meta.count <= capacity_rows:
        raise CorruptMetadata(f"sender {meta.sender} claims {meta.count} rows, capacity {capacity_rows}")
    if nbytes is not None and nbytes != meta.count * row_bytes:
        raise CorruptMetadata(f"sender {meta.sender} put {nbytes} bytes for {meta.count} rows")


# ---------------------------------------------------------------- attention side: plan


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """Where each (token, slot) row of one attention rank goes for one event.

    ``rows[r]``: flat row indices (token * k + slot) sent to rank ``r``, canonical order;
    ``experts[r]``: the expert id of each of those rows. Ranks in ``ranks`` receive a
    (possibly empty) block; the others are excluded and receive nothing.
    """

    event_id: int
    source: int
    num_tokens: int
    top_k: int
    ranks: tuple[int, ...]
    rows: Mapping[int, np.ndarray]
    experts: Mapping[int, np.ndarray]
    incarnation: int = 0

    def count(self, rank: int) -> int:
        return int(self.rows[rank].size)


def plan_dispatch(event_id: int, source: int, topk_ids: np.ndarray, placement: Placement,
                  layout: DispatchLayout, excluded: Iterable[int] = (), incarnation: int = 0,
                  only_rows: np.ndarray | None = None, chooser: ReplicaChooser | None = None) -> DispatchPlan:
    """Decide which rows go to which rank; raise at the sender on capacity overflow.

    ``only_rows`` (flat row indices token * k + slot) plans just those rows, as a retry does
    for the rows whose rank failed: then only ranks that receive rows are posted to. Without
    it every rank not excluded gets a (possibly empty) block, except with a ``chooser`` that
    does not ``explore`` this plan: then only ranks with rows. ``NoLiveReplica`` names an
    expert some planned row needs and no live rank holds. ``chooser`` picks among an expert's
    live holders (``replica_choice``); without it the first live holder serves.
    """
    ids = np.asarray(topk_ids)
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {ids.shape}")
    if not 0 <= source < layout.num_sources:
        raise ValueError(f"source {source} outside 0..{layout.num_sources - 1}")
    if placement.num_ranks != layout.num_ranks:
        raise ValueError(f"placement has {placement.num_ranks} ranks, layout {layout.num_ranks}")
    if ids.size and (ids.min() < 0 or ids.max() >= placement.num_experts):
        raise ValueError(f"expert ids must be in 0..{placement.num_experts - 1}")
    ex = frozenset(excluded)
    flat = ids.reshape(-1).astype(np.int64)
    # Stable sort by expert id keeps (token, slot) order inside each expert: canonical order.
    order = np.argsort(flat, kind="stable")
    if only_rows is not None:
        keep = np.zeros(flat.size, dtype=bool)
        keep[np.asarray(only_rows, dtype=np.int64)] = True
        order = order[keep[order]]
    # Plain lists from here: a decode step has a few dozen rows, where numpy's per-call cost
    # (~1-5 us) dominates (this ran once per MoE layer per attention rank).
    order_l = order.tolist()
    flat_l = flat.tolist()
    routed = [flat_l[o] for o in order_l]
    needed = sorted(set(routed))
    if chooser is None:
        serving = placement.choose(ex, needed)
    else:
        counts: dict[int, int] = {}
        for e in routed:
            counts[e] = counts.get(e, 0) + 1
        serving = chooser.choose(placement, ex, counts)
    serving_l = serving.tolist()
    groups: list[list[int]] = [[] for _ in range(layout.num_ranks)]
    for o, e in zip(order_l, routed):   # canonical order kept inside each rank's block
        groups[serving_l[e]].append(o)
    every = only_rows is None and (chooser is None or chooser.explore())
    ranks = tuple(r for r in range(layout.num_ranks) if r not in ex and (every or groups[r]))
    rows: dict[int, np.ndarray] = {}
    experts: dict[int, np.ndarray] = {}
    for r in ranks:
        sel = groups[r]
        if len(sel) > layout.capacity_rows:
            raise DispatchCapacityError(
                f"source {source} has {len(sel)} rows for expert rank {r}, block capacity {layout.capacity_rows}",
                rows=len(sel), capacity_rows=layout.capacity_rows)
        rows[r] = np.array(sel, dtype=np.int64)
        experts[r] = np.array([flat_l[o] for o in sel], dtype=ID_DTYPE)
    return DispatchPlan(event_id=event_id, source=source, num_tokens=ids.shape[0], top_k=ids.shape[1],
                        ranks=ranks, rows=rows, experts=experts, incarnation=incarnation)


def pack_rows(x: np.ndarray, plan: DispatchPlan, rank: int) -> np.ndarray:
    """The contiguous [n, H] float32 block sent to ``rank`` (row t*k+j carries x[t])."""
    return np.ascontiguousarray(x[plan.rows[rank] // plan.top_k], dtype=DTYPE)


def a2e_meta(plan: DispatchPlan, rank: int, layout: DispatchLayout) -> BlockMeta:
    return BlockMeta(event_id=plan.event_id, sender=plan.source, offset=layout.a2e_offset(plan.source),
                     count=plan.count(rank), expert_ids=plan.experts[rank], incarnation=plan.incarnation)


# ---------------------------------------------------------------- expert side


class SourceGuard:
    """Checks A2E blocks for one expert rank, each source on its own; pure state, no I/O.

    Per source it remembers the newest (incarnation, event id) accepted: a block must be newer
    than that (a replay or a late duplicate is ``EventIdMismatch``); a bigger incarnation is a
    restarted source and starts afresh. A block that does not match the layout, a foreign or
    unsorted expert id is a peer violation (``CorruptMetadata``). A rejected block changes
    nothing: a bad notice costs only itself.
    """

    def __init__(self, layout: DispatchLayout, hosted: frozenset[int]) -> None:
        self.layout = layout
        self.hosted = hosted
        self.last: dict[int, tuple[int, int]] = {}   # source -> (incarnation, event id)

    def accept(self, meta: BlockMeta, nbytes: int | None = None) -> None:
        """Validate ``meta``; on success record it as the source's newest event."""
        if not 0 <= meta.sender < self.layout.num_sources:
            raise CorruptMetadata(f"sender index {meta.sender} outside 0..{self.layout.num_sources - 1}")
        key = (meta.incarnation, meta.event_id)
        prev = self.last.get(meta.sender)
        if prev is not None and key <= prev:
            raise EventIdMismatch(f"stale event {meta.event_id} (incarnation {meta.incarnation}) from source "
                                  f"{meta.sender}; last served {prev[1]} (incarnation {prev[0]})")
        _check_common(meta, event_id=meta.event_id, senders=self.layout.num_sources,
                      offset_of=self.layout.a2e_offset, capacity_rows=self.layout.capacity_rows,
                      nbytes=nbytes, row_bytes=self.layout.row_bytes)
        ids = meta.expert_ids
        if ids.shape != (meta.count,):
            raise CorruptMetadata(f"source {meta.sender}: {ids.shape} expert ids for {meta.count} rows")
        if ids.size:
            lst = ids.tolist()   # a block has a few rows: lists beat numpy's per-call cost
            if any(b < a for a, b in zip(lst, lst[1:])):
                raise CorruptMetadata(f"source {meta.sender}: rows not sorted by expert id")
            foreign = set(lst) - self.hosted
            if foreign:
                raise CorruptMetadata(f"source {meta.sender} sent rows for experts {sorted(foreign)} not hosted here")
        self.last[meta.sender] = key


def run_block(rows: np.ndarray, expert_ids: np.ndarray, expert_fn: ExpertFn, hidden: int) -> np.ndarray:
    """One source's block: rows [n, H] sorted by expert id -> outputs [n, H] in the same order.

    Each expert runs once on its contiguous run of rows, the rows ``reference_moe`` gives it.
    """
    return run_blocks([(rows, expert_ids)], expert_fn, hidden)[0]


def run_blocks(blocks: Sequence[tuple[np.ndarray, np.ndarray]], expert_fn: ExpertFn, hidden: int) -> list[np.ndarray]:
    """Several blocks of one MoE layer (from different sources), each (rows [n, H] sorted by
    expert id, expert ids): each expert runs ONCE, on its rows of every block (block order, then
    row order), and each block gets its own outputs back in its own order.

    Equal, bit for bit, to ``run_block`` of each block alone when ``expert_fn`` computes every row
    on its own (``layers.linear``: a row's bits depend neither on its companions nor on the row
    count); what it saves is one GEMM per expert and source, and the weights read once.
    """
    outs = [np.empty((rows.shape[0], hidden), dtype=DTYPE) for rows, _ in blocks]
    runs: dict[int, list[tuple[int, int, int]]] = {}   # expert id -> (block, first row, end row)
    for bi, (_rows, expert_ids) in enumerate(blocks):
        ids = expert_ids.tolist()
        a = 0
        while a < len(ids):
            b = a + 1
            while b < len(ids) and ids[b] == ids[a]:
                b += 1
            runs.setdefault(ids[a], []).append((bi, a, b))
            a = b
    for e in sorted(runs):
        parts = runs[e]
        if len(parts) == 1:
            bi, a, b = parts[0]
            inp = np.ascontiguousarray(blocks[bi][0][a:b])
        else:
            inp = np.concatenate([blocks[bi][0][a:b] for bi, a, b in parts])
        y = np.asarray(expert_fn(e, inp), dtype=DTYPE)
        if y.shape != inp.shape:
            raise ValueError(f"expert_fn({e}) returned shape {y.shape} for input {inp.shape}")
        o = 0
        for bi, a, b in parts:
            outs[bi][a:b] = y[o:o + b - a]
            o += b - a
    return outs


def e2a_meta(event_id: int, rank: int, count: int, layout: DispatchLayout, incarnation: int = 0,
             error: str = "") -> BlockMeta:
    return BlockMeta(event_id=event_id, sender=rank, offset=layout.e2a_offset(rank), count=count,
                     incarnation=incarnation, error=error)


# ---------------------------------------------------------------- attention side: combine


class CombineCollector:
    """Gathers the E2A metadata of one event from every rank the plan posted to."""

    def __init__(self, plan: DispatchPlan, layout: DispatchLayout) -> None:
        self.plan = plan
        self.layout = layout
        self.blocks: dict[int, BlockMeta] = {}

    @property
    def done(self) -> bool:
        return len(self.blocks) == len(self.plan.ranks)

    def missing(self) -> list[int]:
        return [r for r in self.plan.ranks if r not in self.blocks]

    def add(self, meta: BlockMeta, nbytes: int | None = None) -> bool:
        _check_common(meta, event_id=self.plan.event_id, senders=self.layout.num_ranks,
                      offset_of=self.layout.e2a_offset, capacity_rows=self.layout.capacity_rows,
                      nbytes=nbytes, row_bytes=self.layout.row_bytes)
        if meta.sender not in self.plan.rows:
            raise ProtocolError(f"expert rank {meta.sender} answered event {meta.event_id} it was not sent")
        if meta.sender in self.blocks:
            raise ProtocolError(f"expert rank {meta.sender} answered event {meta.event_id} twice")
        if meta.count != self.plan.count(meta.sender):
            raise CorruptMetadata(f"expert rank {meta.sender} returned {meta.count} rows, "
                                  f"{self.plan.count(meta.sender)} were sent")
        self.blocks[meta.sender] = meta
        return self.done


class AttemptsExhausted(PeerUnreachable):
    """A layer used every attempt id its event id leaves room for (``pack_event_id``: 8 bits)."""


class Verdict(enum.Enum):
    STALE = "stale"        # an answer to an abandoned attempt, or from a rank given up on: drop it
    ANSWER = "answer"      # rows of the current attempt: read them now (``LayerAttempts.fill``)
    REFUSED = "refused"    # the rank refused the current attempt: its rows go to a replica


class LayerAttempts:
    """One MoE layer of one source across as many attempts as its ranks' failures need. Pure.

    Attempt a posts event ``first_event_id + a`` (the attempt field of ``pack_event_id``), so an
    answer to an abandoned attempt is older than the current event and dropped. An answered
    rank's rows are copied out at once (a later attempt may make that rank rewrite its E2A
    block); the rows of a rank that failed (put error, refusal, no answer in time) stay
    missing and ``next_plan`` re-plans only those onto live replicas. The combine runs once,
    when every row is filled, in slot order (``weighted_sum``); each expert computes each row
    on its own (fixed row tiles, see ``run_block``), so which replica served a row, and in
    which attempt, never changes a bit of the result.

    A new attempt is planned only after the previous one is over (every posted rank answered
    or failed): an a2e block is single-buffered, and a rank that answered has consumed its
    block, so the retry may reuse it. A failed rank may still hold an unread block; if it is
    posted to again, it answers the old notice first (with whatever rows the block then holds)
    and that answer is stale by event id: dropped, never combined.
    """

    def __init__(self, first_event_id: int, source: int, topk_ids: np.ndarray, placement: Placement,
                 layout: DispatchLayout, incarnation: int = 0, chooser: ReplicaChooser | None = None) -> None:
        self.ids = np.asarray(topk_ids)
        self.chooser = chooser
        if self.ids.ndim != 2:
            raise ValueError(f"topk_ids must be [T, k], got shape {self.ids.shape}")
        if first_event_id < 0:
            raise ValueError(f"event id {first_event_id} is negative")
        self.first_event_id = first_event_id
        self.source, self.placement, self.layout, self.incarnation = source, placement, layout, incarnation
        self.max_attempts = 256 - (first_event_id & 0xFF)
        self.attempt = -1
        self.plan: DispatchPlan | None = None
        self._coll: CombineCollector | None = None
        self.failed: dict[int, str] = {}          # rank -> why, in the current attempt
        self.failed_ranks: dict[int, str] = {}    # every rank that failed in any attempt
        n = self.ids.shape[0] * self.ids.shape[1]
        self.y = np.empty((n, layout.hidden), dtype=DTYPE)
        self.filled = np.zeros(n, dtype=bool)

    @property
    def event_id(self) -> int:
        if self.plan is None:
            raise RuntimeError("no attempt planned yet")
        return self.plan.event_id

    @property
    def done(self) -> bool:
        return bool(self.filled.all())

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.filled)

    def next_plan(self, excluded: Iterable[int]) -> DispatchPlan:
        """Plan the next attempt: all rows first, then the rows still missing. Raises
        ``NoLiveReplica`` (nothing changed: call again when a rank is back) or
        ``AttemptsExhausted``."""
        if self.plan is not None and self.waiting():
            raise RuntimeError(f"attempt {self.attempt} still waits for ranks {self.waiting()}")
        if self.attempt + 1 >= self.max_attempts:
            raise AttemptsExhausted(f"layer event {self.first_event_id}: {self.attempt + 1} attempts used, "
                                    f"failed ranks {self.failed_ranks}")
        rows = None if self.plan is None else self.missing_rows()
        plan = plan_dispatch(self.first_event_id + self.attempt + 1, self.source, self.ids, self.placement,
                             self.layout, excluded, self.incarnation, only_rows=rows, chooser=self.chooser)
        self.attempt += 1
        self.plan, self._coll, self.failed = plan, CombineCollector(plan, self.layout), {}
        return plan

    def waiting(self) -> list[int]:
        """Ranks of the current attempt that neither answered nor failed."""
        if self._coll is None:
            return []
        return [r for r in self._coll.missing() if r not in self.failed]

    def rank_failed(self, rank: int, why: str) -> None:
        """``rank`` will not answer the current attempt (its rows stay missing)."""
        if self._coll is not None and rank in self.waiting():
            self.failed[rank] = why
            self.failed_ranks[rank] = why

    def accept(self, meta: BlockMeta, nbytes: int | None = None) -> Verdict:
        """Classify an E2A notice; a peer violation on the current event raises ``ProtocolError``."""
        if self.plan is None or self._coll is None:
            raise RuntimeError("no attempt planned yet")
        if meta.incarnation != self.incarnation or meta.event_id < self.plan.event_id:
            return Verdict.STALE
        if meta.event_id == self.plan.event_id and meta.sender in self.failed:
            return Verdict.STALE   # it answered after we gave up on it: its rows went elsewhere
        if meta.error:
            if meta.event_id != self.plan.event_id:
                raise EventIdMismatch(f"expected event {self.plan.event_id}, got a refusal of "
                                      f"{meta.event_id} from rank {meta.sender}")
            if meta.sender not in self.waiting():
                raise ProtocolError(f"expert rank {meta.sender} refused event {meta.event_id} it was not "
                                    f"sent or already answered")
            self.rank_failed(meta.sender, f"refused event {meta.event_id}: {meta.error}")
            return Verdict.REFUSED
        self._coll.add(meta, nbytes)
        return Verdict.ANSWER

    def fill(self, rank: int, rows: np.ndarray) -> None:
        """Copy ``rank``'s answered rows of the current attempt into place."""
        assert self.plan is not None
        idx = self.plan.rows[rank]
        if rows.shape != (idx.size, self.layout.hidden):
            raise CorruptMetadata(f"expert rank {rank} returned rows of shape {rows.shape}, "
                                  f"expected {(idx.size, self.layout.hidden)}")
        self.y[idx] = rows
        self.filled[idx] = True

    def result(self, topk_w: np.ndarray) -> np.ndarray:
        """The combined routed output [T, H] once every row is filled."""
        if not self.done:
            raise RuntimeError(f"{int((~self.filled).sum())} rows still missing")
        t, k = self.ids.shape
        if topk_w.shape != (t, k):
            raise ValueError(f"weights {topk_w.shape} for a layer of {t} x {k}")
        return weighted_sum(topk_w, self.y.reshape(t, k, self.layout.hidden))


def weighted_sum(topk_w: np.ndarray, y: np.ndarray) -> np.ndarray:
    """out[t] = sum_j w[t, j] * y[t, j], added in slot order j = 0..k-1, float32 throughout."""
    w = np.asarray(topk_w, dtype=DTYPE)
    out = w[:, 0, None] * y[:, 0]
    for j in range(1, w.shape[1]):
        out += w[:, j, None] * y[:, j]
    return out


def combine(plan: DispatchPlan, outputs: Mapping[int, np.ndarray], topk_w: np.ndarray, hidden: int) -> np.ndarray:
    """Scatter each rank's returned rows back to (token, slot) and apply the gate weights."""
    y = np.empty((plan.num_tokens * plan.top_k, hidden), dtype=DTYPE)
    filled = 0
    for r in plan.ranks:
        y[plan.rows[r]] = outputs[r]
        filled += plan.count(r)
    if filled != y.shape[0]:
        raise ValueError(f"combine got {filled} rows for {y.shape[0]} (token, slot) pairs")
    return weighted_sum(topk_w, y.reshape(plan.num_tokens, plan.top_k, hidden))


# ---------------------------------------------------------------- oracle


def reference_moe(xs: Sequence[np.ndarray], topk_ids: Sequence[np.ndarray], topk_w: Sequence[np.ndarray],
                  expert_fn: ExpertFn) -> list[np.ndarray]:
    """The direct computation for M independent attention ranks, no transport, no placement.

    For each source s on its own: expert e runs on the rows x_s[t] with ids_s[t, j] == e, in
    (t, j) order; then out_s[t] = sum_j w_s[t, j] * y_s[t, j] in slot order.
    """
    out = []
    for x, ids, w in zip(xs, topk_ids, topk_w):
        ids = np.asarray(ids)
        hidden = x.shape[1]
        y = np.empty((ids.shape[0], ids.shape[1], hidden), dtype=DTYPE)
        for e in np.unique(ids).tolist():
            where = np.argwhere(ids == e)  # row-major: (t, j) order
            y[where[:, 0], where[:, 1]] = np.asarray(expert_fn(e, np.asarray(x, dtype=DTYPE)[where[:, 0]]),
                                                     dtype=DTYPE)
        out.append(weighted_sum(w, y))
    return out
