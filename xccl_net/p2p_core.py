"""Pure core of XCCL two-sided messaging: framing, chunking and the receiver's checks.

No I/O, no asyncio: the shm, tcp and mem endpoints all feed chunks into ``Reassembler``
and act on the effects it returns (deliver, acknowledge, negative-acknowledge).

Rules of a peer pair (src -> dst), identical on every transport:
- every message carries an event id; ids of a pair start at 1 and grow by exactly one;
- a message of ``total`` bytes is cut into ``n_chunks = max(1, ceil(total / chunk_bytes))``
  chunks of the RECEIVER's slot size, sent in order 0..n-1;
- an event id <= the last one delivered is a duplicate: discarded, never delivered twice;
- an event id > last + 1 is an ``EventIdMismatch`` unless its first chunk carries
  ``FLAG_RESET`` (the sender gave up on earlier events after a timeout, so gaps and a
  half-written message before it are expected and dropped);
- a chunk out of order inside a message is a ``ChunkOrderError``: the partial message is
  dropped (decision: detect, do not reassemble; the sender is told by a NACK);
- impossible sizes/counts are ``CorruptMetadata``.
A violation consumes the offending chunk and is reported to both sides; the pair stays usable.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from xccl_net.errors import BufferTooSmall, ChunkOrderError, CorruptMetadata, EventIdMismatch, ProtocolError

KIND_DATA = 0
KIND_NOTIFY = 1
KINDS = (KIND_DATA, KIND_NOTIFY)

FLAG_RESET = 1
# The message itself was written straight into the receiver's posted buffer; the ring carries
# only ``direct_record(post_seq, nbytes)``.
FLAG_DIRECT = 2

NACK_NONE = 0
NACK_CODES: dict[type[ProtocolError], int] = {EventIdMismatch: 1, ChunkOrderError: 2, CorruptMetadata: 3}
NACK_ERRORS: dict[int, type[ProtocolError]] = {v: k for k, v in NACK_CODES.items()}

_COUNT = struct.Struct("<I")
_DIRECT = struct.Struct("<QQ")
DIRECT_RECORD_BYTES = _DIRECT.size
MAX_FRAMES = 4096


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    event_id: int
    chunk_id: int
    n_chunks: int
    total_bytes: int
    kind: int
    flags: int


@dataclass(frozen=True, slots=True)
class Delivered:
    event_id: int
    kind: int
    data: np.ndarray | bytes
    into: bool = False      # ``data`` is the buffer ``claim`` returned (the caller's), not a fresh one
    direct: bool = False    # ``data`` is a direct record: the message is in the posted buffer already


@dataclass(frozen=True, slots=True)
class Violation:
    event_id: int
    error: ProtocolError


@dataclass(frozen=True, slots=True)
class Discarded:
    event_id: int
    chunk_id: int


Effect = Delivered | Violation | Discarded


def direct_record(post_seq: int, nbytes: int) -> bytes:
    return _DIRECT.pack(post_seq, nbytes)


def parse_direct(data: bytes | np.ndarray) -> tuple[int, int]:
    """(post_seq, nbytes) of a direct record."""
    return _DIRECT.unpack(bytes(data))


def n_chunks_for(total_bytes: int, chunk_bytes: int) -> int:
    return max(1, -(-total_bytes // chunk_bytes))


def as_byte_views(frames: Sequence[object]) -> list[memoryview]:
    """Flat uint8 views of caller buffers (no copy); non-contiguous buffers are refused."""
    views = []
    for f in frames:
        mv = memoryview(f)  # type: ignore[arg-type]
        if not mv.c_contiguous:
            raise ValueError("frames must be C-contiguous buffers")
        views.append(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv)
    return views


def frame_prefix(views: Sequence[memoryview]) -> bytes:
    """Frame table written before the frames: u32 count, then one u64 length per frame."""
    if len(views) > MAX_FRAMES:
        raise ValueError(f"at most {MAX_FRAMES} frames per message")
    return _COUNT.pack(len(views)) + struct.pack(f"<{len(views)}Q", *(v.nbytes for v in views))


def split_message(data: np.ndarray | bytes | bytearray) -> list[memoryview]:
    """Inverse of ``frame_prefix`` + frames; views into ``data`` (no copy)."""
    mv = memoryview(data)
    if mv.nbytes < _COUNT.size:
        raise CorruptMetadata("message shorter than its frame table")
    (n,) = _COUNT.unpack_from(mv, 0)
    table_end = _COUNT.size + 8 * n
    if n > MAX_FRAMES or table_end > mv.nbytes:
        raise CorruptMetadata(f"frame table of {n} frames does not fit a {mv.nbytes} B message")
    lens = struct.unpack_from(f"<{n}Q", mv, _COUNT.size)
    if table_end + sum(lens) != mv.nbytes:
        raise CorruptMetadata(f"frame lengths sum to {sum(lens)}, message holds {mv.nbytes - table_end}")
    out, pos = [], table_end
    for ln in lens:
        out.append(mv[pos:pos + ln])
        pos += ln
    return out


def pack_into(buf: np.ndarray, frames: Sequence[memoryview]) -> tuple[list[memoryview], int]:
    """Lay out ``frames`` in ``buf`` exactly as on the wire (frame table, then the frames) and
    return views of the frames in ``buf`` plus the bytes used. Nothing is written when the
    message does not fit (``BufferTooSmall``)."""
    prefix = frame_prefix(frames)
    total = len(prefix) + sum(f.nbytes for f in frames)
    if total > buf.nbytes:
        raise BufferTooSmall(total, buf.nbytes)
    out = buf.data
    out[:len(prefix)] = prefix
    pos = len(prefix)
    for f in frames:
        out[pos:pos + f.nbytes] = f
        pos += f.nbytes
    return split_message(buf[:total]), total


def gather_into(dst: memoryview, pieces: Sequence[memoryview], start: int) -> None:
    """Copy bytes [start, start + len(dst)) of the concatenation of ``pieces`` into ``dst``."""
    need, out, pos = dst.nbytes, 0, 0
    for p in pieces:
        n = p.nbytes
        if pos + n <= start:
            pos += n
            continue
        lo = max(0, start - pos)
        take = min(n - lo, need - out)
        dst[out:out + take] = p[lo:lo + take]
        out += take
        pos += n
        if out == need:
            return
    if out != need:
        raise ValueError("pieces shorter than the requested range")


Claim = Callable[[int], "np.ndarray | None"]


class Reassembler:
    """Receiver state for one peer pair; ``on_chunk`` returns the effects to carry out.

    Where a data message is gathered: ``claim(total_bytes)`` is asked when its first chunk
    arrives; it returns a uint8 array of exactly ``total_bytes`` (a caller's posted buffer:
    the chunks are copied straight into it, ``Delivered.into`` is True) or None (a fresh
    buffer is allocated, as without ``claim``). ``release(target)`` hands a claimed buffer
    back mid-message: the part already received moves to a fresh buffer and the rest of the
    message goes there, so nothing is written into the buffer afterwards and nothing is lost.
    ``adopt()`` is the converse: a message already in progress in a fresh buffer moves into a
    buffer posted late (the received part is copied once) and continues there.
    """

    def __init__(self, chunk_bytes: int, max_message_bytes: int, claim: Claim | None = None) -> None:
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.last_event = 0
        self._claim = claim
        self._cur: ChunkHeader | None = None
        self._next_chunk = 0
        self._buf: np.ndarray | None = None
        self._into = False  # _buf is a claimed (caller's) buffer

    def holds(self, target: np.ndarray) -> bool:
        """Is a message in progress being gathered into ``target``?"""
        return self._into and self._buf is target

    def adopt(self) -> bool:
        """A buffer was posted while a data message is being gathered into a fresh one: ask
        ``claim`` for it, move the part received so far there (the one copy of those bytes)
        and gather the rest straight into it. False: nothing in progress, or no buffer."""
        cur = self._cur
        if cur is None or self._into or self._buf is None or cur.kind != KIND_DATA:
            return False
        target = self._target(cur)
        if target is None:
            return False
        done = min(self._next_chunk * self.chunk_bytes, cur.total_bytes)
        target[:done] = self._buf[:done]
        self._buf, self._into = target, True
        return True

    def release(self, target: np.ndarray) -> bool:
        """Stop writing into ``target``: a partial message in it moves to a fresh buffer."""
        if not self.holds(target):
            return False
        assert self._cur is not None and self._buf is not None
        fresh = np.empty(self._cur.total_bytes, dtype=np.uint8)
        done = min(self._next_chunk * self.chunk_bytes, self._cur.total_bytes)
        fresh[:done] = self._buf[:done]
        self._buf, self._into = fresh, False
        return True

    def _target(self, h: ChunkHeader) -> np.ndarray | None:
        if self._claim is None or h.kind != KIND_DATA:
            return None
        target = self._claim(h.total_bytes)
        if target is not None and (target.dtype != np.uint8 or target.nbytes != h.total_bytes):
            raise ValueError(f"claim returned {target.nbytes} B of {target.dtype}, need {h.total_bytes} uint8")
        return target

    def reset(self) -> None:
        """The peer restarted: its event ids begin again at 1."""
        self.last_event = 0
        self._drop_partial()

    def _drop_partial(self) -> None:
        self._cur, self._buf, self._next_chunk, self._into = None, None, 0, False

    def _check(self, h: ChunkHeader, nbytes: int) -> CorruptMetadata | None:
        if h.kind not in KINDS or h.event_id <= 0:
            return CorruptMetadata(f"bad kind {h.kind} or event id {h.event_id}")
        if not 0 <= h.total_bytes <= self.max_message_bytes:
            return CorruptMetadata(f"message size {h.total_bytes} B outside 0..{self.max_message_bytes}")
        if h.n_chunks != n_chunks_for(h.total_bytes, self.chunk_bytes) or not 0 <= h.chunk_id < h.n_chunks:
            return CorruptMetadata(f"chunk {h.chunk_id}/{h.n_chunks} impossible for {h.total_bytes} B")
        if h.flags & FLAG_DIRECT and (h.kind != KIND_DATA or h.total_bytes != DIRECT_RECORD_BYTES):
            return CorruptMetadata(f"direct record of {h.total_bytes} B (kind {h.kind})")
        want = min(self.chunk_bytes, h.total_bytes - h.chunk_id * self.chunk_bytes)
        if nbytes != want:
            return CorruptMetadata(f"chunk {h.chunk_id} holds {nbytes} B, expected {want}")
        return None

    def on_chunk(self, h: ChunkHeader, payload: memoryview) -> list[Effect]:
        bad = self._check(h, payload.nbytes)
        if bad is not None:
            return [Violation(h.event_id, bad)]
        effects: list[Effect] = []
        cur = self._cur
        if cur is not None:
            if h.event_id == cur.event_id and h.chunk_id == self._next_chunk:
                if h.n_chunks != cur.n_chunks or h.total_bytes != cur.total_bytes or h.kind != cur.kind:
                    self._drop_partial()
                    self.last_event = cur.event_id
                    return [Violation(cur.event_id, CorruptMetadata(
                        f"event {cur.event_id}: chunk {h.chunk_id} disagrees with chunk 0 on size"))]
                return self._append(h, payload)
            if h.event_id == cur.event_id and h.chunk_id < self._next_chunk:
                return [Discarded(h.event_id, h.chunk_id)]
            if h.event_id < cur.event_id:
                return [Discarded(h.event_id, h.chunk_id)]
            # Anything else breaks the message in progress.
            expected = self._next_chunk
            self._drop_partial()
            if not (h.chunk_id == 0 and h.flags & FLAG_RESET and h.event_id > cur.event_id):
                self.last_event = cur.event_id
                effects.append(Violation(cur.event_id, ChunkOrderError(
                    f"event {cur.event_id}: expected chunk {expected}, "
                    f"got event {h.event_id} chunk {h.chunk_id}")))
                if h.event_id == cur.event_id:
                    return effects
        if h.event_id <= self.last_event:
            effects.append(Discarded(h.event_id, h.chunk_id))
            return effects
        if h.event_id != self.last_event + 1 and not (h.flags & FLAG_RESET and h.chunk_id == 0):
            effects.append(Violation(h.event_id, EventIdMismatch(
                f"expected event {self.last_event + 1}, got {h.event_id}")))
            return effects
        if h.chunk_id != 0:
            self.last_event = h.event_id
            effects.append(Violation(h.event_id, ChunkOrderError(
                f"event {h.event_id}: first chunk seen is {h.chunk_id}, expected 0")))
            return effects
        if h.flags & FLAG_DIRECT:
            self.last_event = h.event_id
            effects.append(Delivered(h.event_id, h.kind, bytes(payload), direct=True))
            return effects
        target = self._target(h)
        if h.n_chunks == 1:
            self.last_event = h.event_id
            if target is None:
                effects.append(Delivered(h.event_id, h.kind, bytes(payload)))
            else:
                target.data[:] = payload
                effects.append(Delivered(h.event_id, h.kind, target, into=True))
            return effects
        self._cur, self._next_chunk = h, 0
        # np.empty, not bytearray: no zero-fill pass, and numpy asks for huge pages on big
        # buffers, so first touch runs near memcpy speed instead of ~2 GB/s of page faults.
        self._buf = np.empty(h.total_bytes, dtype=np.uint8) if target is None else target
        self._into = target is not None
        effects.extend(self._append(h, payload))
        return effects

    def _append(self, h: ChunkHeader, payload: memoryview) -> list[Effect]:
        assert self._buf is not None
        lo = h.chunk_id * self.chunk_bytes
        self._buf.data[lo:lo + payload.nbytes] = payload
        self._next_chunk += 1
        if self._next_chunk < h.n_chunks:
            return []
        buf, into = self._buf, self._into
        self._drop_partial()
        self.last_event = h.event_id
        return [Delivered(h.event_id, h.kind, buf, into)]
