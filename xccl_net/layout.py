"""Byte layout of an shm endpoint's segment: the emulated NPU "global memory".

Pure: works on any writable buffer (an mmap in production, a bytearray in unit tests).

    [header 4 KiB][peer table: max_peers x 256 B][rings: max_peers x ring][app windows]

- header: magic, layout version, owner pid, npu, incarnation, state, ring geometry,
  doorbell-pending flag, window table (name, offset, size);
- peer entry i (metadata area of one peer pair): the peer's name and, as u64 words,
  written by the PEER (writer of the ring that lives in this segment): writer incarnation,
  tail (slots written), last event id, last chunk id;
  written by the peer as READER of the ring in ITS segment that WE write (acknowledgement):
  out_head (slots consumed), out_acked (last event delivered), nack event + code;
  and, written by the peer as writer, "writer waits" (ring it when acknowledging);
- ring i: ``ring_slots`` slots of (64 B slot header + ``slot_bytes`` payload), owned by this
  segment, written only by peer i;
- windows: page-aligned app data areas (KV cache, A2E buffers).
All multi-byte fields are aligned u64, so a store is one machine word (no torn values).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from xccl_net.errors import CorruptMetadata

MAGIC = int.from_bytes(b"XDSXCCL\x01", "little")
VERSION = 2   # 2: peer-entry word P_WRITER_WAITS (a reader rings only writers that wait)
PAGE = 4096
HEADER_BYTES = PAGE
PEER_ENTRY_BYTES = 256
PEER_NAME_BYTES = 64
SLOT_HEADER_BYTES = 64
SLOT_CHECK_SALT = 0x5CC1_0B0E_D15C_A11E
WINDOW_TABLE_OFF = 256
WINDOW_ENTRY_BYTES = 64
WINDOW_NAME_BYTES = 48
MAX_WINDOWS = 16

STATE_OPEN = 1
STATE_CLOSED = 2

# header words (u64 index)
H_MAGIC, H_VERSION, H_PID, H_NPU, H_INCARNATION, H_STATE = 0, 1, 2, 3, 4, 5
H_MAX_PEERS, H_RING_SLOTS, H_SLOT_BYTES, H_N_WINDOWS, H_BELL_PENDING, H_TOTAL = 6, 7, 8, 9, 10, 11

# peer entry words (u64 index relative to the first word after the name)
P_CLAIMED, P_WRITER_INC, P_TAIL, P_EVENT, P_CHUNK = 0, 1, 2, 3, 4
P_OUT_HEAD, P_OUT_ACKED, P_NACK_EVENT, P_NACK_CODE, P_READER_INC = 5, 6, 7, 8, 9
# A receive posted in a window of the peer (written by the peer, as the other fields): where the
# writer may put its next message directly (shm_endpoint ``_publish``); and the writer's claim of it.
P_POST_SEQ, P_POST_OFF, P_POST_LEN, P_TAKEN, P_POST_INC = 10, 11, 12, 13, 14
# Written by the writer of the ring in this segment: "I am parked on your acknowledgement (ring
# space, or the delivery of a message): ring me when you write one". Cleared by the reader when
# it rings. Without it the reader writes acknowledgements silently: a writer that does not wait
# (a put's notification) costs its reader no wake-up of the writer.
P_WRITER_WAITS = 15

# slot header words
S_EVENT, S_CHUNK, S_NCHUNKS, S_TOTAL, S_NBYTES, S_KIND, S_FLAGS, S_CHECK = range(8)

_WIN = struct.Struct(f"<{WINDOW_NAME_BYTES}sQQ")


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def segment_name(namespace: str, name: str) -> str:
    """Deterministic file name under /dev/shm of endpoint (namespace, name)."""
    return f"xds.{namespace}.{name}"


def slot_check(words: tuple[int, ...]) -> int:
    x = SLOT_CHECK_SALT
    for w in words:
        x ^= w
        x = ((x << 7) | (x >> 57)) & 0xFFFF_FFFF_FFFF_FFFF
    return x


@dataclass(frozen=True, slots=True)
class Geometry:
    max_peers: int
    ring_slots: int
    slot_bytes: int
    windows: tuple[tuple[str, int], ...]

    @property
    def peers_off(self) -> int:
        return HEADER_BYTES

    @property
    def slot_stride(self) -> int:
        return SLOT_HEADER_BYTES + self.slot_bytes

    @property
    def ring_bytes(self) -> int:
        return _round_up(self.ring_slots * self.slot_stride)

    @property
    def rings_off(self) -> int:
        return HEADER_BYTES + _round_up(self.max_peers * PEER_ENTRY_BYTES)

    @property
    def windows_off(self) -> int:
        return self.rings_off + self.max_peers * self.ring_bytes

    def window_offsets(self) -> dict[str, tuple[int, int]]:
        out, off = {}, self.windows_off
        for wname, size in self.windows:
            out[wname] = (off, size)
            off += _round_up(max(size, 1))
        return out

    @property
    def total_bytes(self) -> int:
        return self.windows_off + sum(_round_up(max(s, 1)) for _, s in self.windows)

    def entry_word(self, idx: int, field: int) -> int:
        """u64 index of ``field`` of peer entry ``idx``."""
        return (self.peers_off + idx * PEER_ENTRY_BYTES + PEER_NAME_BYTES) // 8 + field

    def ring_off(self, idx: int) -> int:
        return self.rings_off + idx * self.ring_bytes

    def slot_off(self, idx: int, pos: int) -> int:
        """Byte offset of the header of slot ``pos % ring_slots`` in ring ``idx``."""
        return self.ring_off(idx) + (pos % self.ring_slots) * self.slot_stride


@dataclass(frozen=True, slots=True)
class Header:
    pid: int
    npu: int
    incarnation: int
    state: int
    geometry: Geometry
    windows: Mapping[str, tuple[int, int]]


def write_header(buf: memoryview, words: memoryview, geo: Geometry, *, pid: int, npu: int,
                 incarnation: int) -> None:
    if len(geo.windows) > MAX_WINDOWS:
        raise ValueError(f"at most {MAX_WINDOWS} windows")
    for i, (wname, (off, size)) in enumerate(geo.window_offsets().items()):
        _WIN.pack_into(buf, WINDOW_TABLE_OFF + i * WINDOW_ENTRY_BYTES, wname.encode(), off, size)
    for idx, val in ((H_VERSION, VERSION), (H_PID, pid), (H_NPU, npu), (H_INCARNATION, incarnation),
                     (H_STATE, STATE_OPEN), (H_MAX_PEERS, geo.max_peers), (H_RING_SLOTS, geo.ring_slots),
                     (H_SLOT_BYTES, geo.slot_bytes), (H_N_WINDOWS, len(geo.windows)),
                     (H_TOTAL, geo.total_bytes)):
        words[idx] = val
    words[H_MAGIC] = MAGIC  # last: a reader that sees the magic sees a complete header


def read_header(buf: memoryview, words: memoryview) -> Header:
    """Parse and sanity-check a header; impossible values raise CorruptMetadata."""
    if buf.nbytes < HEADER_BYTES or words[H_MAGIC] != MAGIC:
        raise CorruptMetadata("segment has no XCCL magic (not initialised or overwritten)")
    if words[H_VERSION] != VERSION:
        raise CorruptMetadata(f"segment layout version {words[H_VERSION]}, expected {VERSION}")
    n_win = words[H_N_WINDOWS]
    if n_win > MAX_WINDOWS:
        raise CorruptMetadata(f"segment claims {n_win} windows")
    wins = []
    for i in range(n_win):
        raw, off, size = _WIN.unpack_from(buf, WINDOW_TABLE_OFF + i * WINDOW_ENTRY_BYTES)
        wins.append((raw.rstrip(b"\0").decode("utf-8", "replace"), size))
    geo = Geometry(max_peers=words[H_MAX_PEERS], ring_slots=words[H_RING_SLOTS],
                   slot_bytes=words[H_SLOT_BYTES], windows=tuple(wins))
    if (not 1 <= geo.max_peers <= 1024 or geo.ring_slots < 2 or geo.slot_bytes < 256
            or geo.total_bytes != words[H_TOTAL] or geo.total_bytes > buf.nbytes):
        raise CorruptMetadata("segment geometry is inconsistent with its size")
    return Header(pid=words[H_PID], npu=words[H_NPU], incarnation=words[H_INCARNATION],
                  state=words[H_STATE], geometry=geo, windows=geo.window_offsets())


def entry_name(buf: memoryview, geo: Geometry, idx: int) -> str:
    off = geo.peers_off + idx * PEER_ENTRY_BYTES
    return bytes(buf[off:off + PEER_NAME_BYTES]).rstrip(b"\0").decode("utf-8", "replace")


def find_entry(buf: memoryview, words: memoryview, geo: Geometry, name: str) -> int | None:
    for idx in range(geo.max_peers):
        if words[geo.entry_word(idx, P_CLAIMED)] and entry_name(buf, geo, idx) == name:
            return idx
    return None


def claim_entry(buf: memoryview, words: memoryview, geo: Geometry, name: str) -> int | None:
    """Find ``name``'s entry or take a free one (caller holds the segment's file lock).

    Returns None when the table is full.
    """
    idx = find_entry(buf, words, geo, name)
    if idx is not None:
        return idx
    raw = name.encode()
    if len(raw) > PEER_NAME_BYTES:
        raise ValueError(f"peer name {name!r} longer than {PEER_NAME_BYTES} bytes")
    for idx in range(geo.max_peers):
        if not words[geo.entry_word(idx, P_CLAIMED)]:
            off = geo.peers_off + idx * PEER_ENTRY_BYTES
            buf[off:off + PEER_NAME_BYTES] = raw.ljust(PEER_NAME_BYTES, b"\0")
            for f in range(1, (PEER_ENTRY_BYTES - PEER_NAME_BYTES) // 8):
                words[geo.entry_word(idx, f)] = 0
            words[geo.entry_word(idx, P_CLAIMED)] = 1
            return idx
    return None
