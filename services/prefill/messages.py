"""The prefill service's own RPC messages (beyond services/protocol/inference.py): its stats."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.wire import message


@message("prefill.StatsQuery")
@dataclass(frozen=True, slots=True)
class PrefillStatsQuery:
    pass


@message("prefill.Stats")
@dataclass(frozen=True, slots=True)
class PrefillStats:
    requests: int           # answered with PrefillDone
    cached_tokens: int      # positions taken from the KV pool's prefix cache, summed
    computed_tokens: int    # positions computed here, summed
    invalid: int            # refused with INVALID_ARGUMENT
    failed: int             # failed otherwise (KV pool unavailable, ...)
    batches: int            # forward passes (a batch serves all requests waiting at that moment)
    max_batch_seen: int
    inflight: int           # requests being served now
    staged: int = 0         # sequences whose KV waits in the staging area for a decode rank
    pool_skipped: int = 0   # prefix lookups not tried: the KV pool was down
    cached_in_pool: int = 0  # sequences also written to the pool
