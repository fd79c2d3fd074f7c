"""KV pool core: KV blocks keyed by the hash chain of their token prefix (pure, no I/O).

A block holds the K and V of ``block_size`` consecutive tokens for every layer. Its key is
``h_i = H(h_{i-1} || tokens of block i)``, so equal keys mean equal *prefixes*, not merely equal
blocks, and the longest cached prefix is the longest run of present keys from the start.

Lifecycle of a slot (one table, see ``SLOT_TRANSITIONS``): free -> writing (reserved by a
writer, invisible to readers) -> ready (committed, readable, evictable when unpinned) -> free.
Readers pin ready blocks while they copy them out; pins and write reservations are leases
that expire, so a client that dies mid-transfer cannot leak capacity. Eviction is LRU among
ready, unpinned blocks.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT_HASH = b"\x00" * 16


def block_hashes(tokens: Sequence[int], block_size: int, parent: bytes = ROOT_HASH) -> list[bytes]:
    """Chain hashes of the *full* blocks of ``tokens`` (a trailing partial block has none)."""
    out, h = [], parent
    for i in range(0, len(tokens) - len(tokens) % block_size, block_size):
        blk = b"".join(int(t).to_bytes(4, "little") for t in tokens[i:i + block_size])
        h = hashlib.blake2b(h + blk, digest_size=16).digest()
        out.append(h)
    return out


class PoolError(Exception):
    """Base of KV pool errors."""


class PoolFull(PoolError):
    """No free or evictable slot: the caller should compute without caching, not wait."""


class UnknownBlock(PoolError):
    """A commit/release names a block that this pool does not hold in the required state."""


SLOT_TRANSITIONS = {("free", "reserve"): "writing", ("writing", "commit"): "ready",
                    ("writing", "abort"): "free", ("ready", "evict"): "free"}


@dataclass(slots=True)
class _Block:
    slot: int
    state: str                       # writing | ready
    owner: str = ""                  # writer (while writing)
    expires: float = 0.0             # write lease
    pins: dict[str, float] = field(default_factory=dict)  # reader -> lease expiry


@dataclass(frozen=True, slots=True)
class PoolStats:
    capacity: int
    ready: int
    writing: int
    pinned: int
    free: int
    hits: int
    misses: int
    evictions: int


class KVPoolCore:
    def __init__(self, capacity_blocks: int, *, lease_s: float = 10.0) -> None:
        if capacity_blocks <= 0:
            raise ValueError("capacity_blocks must be > 0")
        self.capacity, self.lease_s = capacity_blocks, lease_s
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self.hits = self.misses = self.evictions = 0

    # -- lookups ---------------------------------------------------------------------------
    def match(self, hashes: Sequence[bytes]) -> int:
        """Number of leading blocks that are ready (the longest cached prefix, in blocks)."""
        n = 0
        for h in hashes:
            b = self._blocks.get(h)
            if b is None or b.state != "ready":
                break
            n += 1
        return n

    def acquire(self, hashes: Sequence[bytes], reader: str, now: float) -> list[int]:
        """Pin the longest ready prefix for ``reader``; returns its slots (maybe empty)."""
        self.expire(now)
        n = self.match(hashes)
        self.hits += n
        self.misses += len(hashes) - n
        slots = []
        for h in hashes[:n]:
            b = self._blocks[h]
            b.pins[reader] = now + self.lease_s
            self._blocks.move_to_end(h)
            slots.append(b.slot)
        return slots

    def release(self, hashes: Sequence[bytes], reader: str) -> int:
        """Unpin; returns how many pins were dropped (unknown pins are ignored: idempotent)."""
        dropped = 0
        for h in hashes:
            b = self._blocks.get(h)
            if b is not None and b.pins.pop(reader, None) is not None:
                dropped += 1
        return dropped

    def release_owner(self, owner: str) -> int:
        """Drop every pin and write reservation of ``owner`` (a request that ended or died)."""
        dropped = 0
        for h in list(self._blocks):
            b = self._blocks[h]
            if b.pins.pop(owner, None) is not None:
                dropped += 1
            if b.state == "writing" and b.owner == owner:
                self._drop(h)
                dropped += 1
        return dropped

    # -- writes ----------------------------------------------------------------------------
    def reserve(self, hashes: Sequence[bytes], writer: str, now: float) -> list[tuple[bytes, int]]:
        """Reserve slots for the blocks not yet held; returns (hash, slot) to write.

        Blocks already ready or being written by someone else are skipped (they will be
        there). Stops at the first block that cannot get a slot: a prefix cache is only
        useful as a prefix. Never raises for a full pool: it returns fewer blocks.
        """
        self.expire(now)
        out = []
        for h in hashes:
            if h in self._blocks:
                continue
            slot = self._take_slot()
            if slot is None:
                break
            self._blocks[h] = _Block(slot, "writing", writer, now + self.lease_s)
            out.append((h, slot))
        return out

    def commit(self, hashes: Sequence[bytes], writer: str) -> None:
        for h in hashes:
            b = self._blocks.get(h)
            if b is None or b.state != "writing" or b.owner != writer:
                raise UnknownBlock(f"block {h.hex()[:12]} is not being written by {writer!r}")
        for h in hashes:
            b = self._blocks[h]
            b.state, b.owner = "ready", ""
            self._blocks.move_to_end(h)

    def abort(self, hashes: Sequence[bytes], writer: str) -> None:
        for h in hashes:
            b = self._blocks.get(h)
            if b is not None and b.state == "writing" and b.owner == writer:
                self._drop(h)

    # -- housekeeping ----------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Drop expired pins and write reservations (their holders are presumed dead)."""
        n = 0
        for h in list(self._blocks):
            b = self._blocks[h]
            for reader in [r for r, t in b.pins.items() if t <= now]:
                del b.pins[reader]
                n += 1
            if b.state == "writing" and b.expires <= now:
                self._drop(h)
                n += 1
        return n

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for h, b in self._blocks.items():  # oldest first
            if b.state == "ready" and not b.pins:
                self._drop(h)
                self.evictions += 1
                return self._free.pop()
        return None

    def _drop(self, h: bytes) -> None:
        self._free.append(self._blocks.pop(h).slot)

    def stats(self) -> PoolStats:
        ready = sum(1 for b in self._blocks.values() if b.state == "ready")
        return PoolStats(self.capacity, ready, len(self._blocks) - ready,
                         sum(1 for b in self._blocks.values() if b.pins), len(self._free),
                         self.hits, self.misses, self.evictions)


class HashRing:
    """Consistent hashing of block keys over pool nodes (virtual nodes smooth the spread).

    Adding or removing a node moves only the keys of the arcs it owned.
    """

    def __init__(self, nodes: Sequence[str], vnodes: int = 64) -> None:
        if not nodes:
            raise ValueError("a hash ring needs at least one node")
        if len(set(nodes)) != len(nodes):
            raise ValueError("duplicate node names")
        points = []
        for n in nodes:
            for v in range(vnodes):
                key = int.from_bytes(hashlib.blake2b(f"{n}#{v}".encode(), digest_size=8).digest(), "big")
                points.append((key, n))
        points.sort()
        self._keys = [k for k, _ in points]
        self._nodes = [n for _, n in points]
        self.nodes = tuple(nodes)

    def node_for(self, block_hash: bytes) -> str:
        key = int.from_bytes(block_hash[:8], "big")
        i = bisect.bisect_right(self._keys, key) % len(self._keys)
        return self._nodes[i]
