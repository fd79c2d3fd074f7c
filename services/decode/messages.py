"""The decode master's own RPC messages (beyond services/protocol/inference.py): its stats."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.wire import message


@message("decode.StatsQuery")
@dataclass(frozen=True, slots=True)
class DecodeStatsQuery:
    pass


@message("decode.Stats")
@dataclass(frozen=True, slots=True)
class DecodeStats:
    running: int                # running + loading (what the batch limit counts)
    queued: int
    free_kv_blocks: int
    kv_blocks: int
    max_batch: int
    steps: int
    tokens: int
    admitted: int
    refused: int
    finished: int
    cancelled: int
    failed: int
    queue_peak: int
    live_ranks: int
    unroutable_pushes: int      # tokens for a router we hold no identity of
