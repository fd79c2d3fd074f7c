"""KV pool metadata messages (ZeroMQ RPC); block bytes move over XCCL put/get into the pool's
``kv`` window at ``slot * block_bytes``. See services/kvpool/core.py for the slot lifecycle."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.wire import message


@message("kv.Acquire")
@dataclass(frozen=True, slots=True)
class Acquire:
    owner: str
    hashes: tuple[bytes, ...]


@message("kv.Reserve")
@dataclass(frozen=True, slots=True)
class Reserve:
    owner: str
    hashes: tuple[bytes, ...]


@message("kv.Slots")
@dataclass(frozen=True, slots=True)
class Slots:
    """Answer to Acquire (leading present blocks) and Reserve (blocks to write)."""
    hashes: tuple[bytes, ...]
    slots: tuple[int, ...]
    block_bytes: int


@message("kv.Commit")
@dataclass(frozen=True, slots=True)
class Commit:
    owner: str
    hashes: tuple[bytes, ...]


@message("kv.Release")
@dataclass(frozen=True, slots=True)
class Release:
    owner: str
    hashes: tuple[bytes, ...] = ()
    everything: bool = False       # drop all pins and reservations of owner


@message("kv.StatsQuery")
@dataclass(frozen=True, slots=True)
class StatsQuery:
    pass


@message("kv.Stats")
@dataclass(frozen=True, slots=True)
class Stats:
    capacity: int
    ready: int
    writing: int
    pinned: int
    free: int
    hits: int
    misses: int
    evictions: int


@message("kv.StageRelease")
@dataclass(frozen=True, slots=True)
class StageRelease:
    """Attention rank -> prefill, one-way: the KV staged under ``stage_id`` for ``owner`` (the
    request id) is loaded (or no longer wanted); the prefill frees it."""
    owner: str
    stage_id: int
