"""The attention rank's KV cache: block-accounted, stored contiguously per sequence.

Capacity is accounted in blocks of ``block_size`` positions (a sequence reserving ``capacity``
positions takes ``ceil(capacity / block_size)`` blocks of the rank's budget), exactly like a
paged cache, so admission control and load reporting speak the same unit as the KV pool. The
storage, however, is one contiguous ``[num_kv_heads, capacity, head_dim]`` float32 K and V
array per sequence per layer. Why: the attention kernel (``layers.attention_block``) reads
each query's keys ``0..p`` as one contiguous slice, the very call the reference engine makes;
gathering scattered pages into a temporary first would add a copy per layer per step and a
second code path whose bits would have to be proven equal. Contiguous storage keeps the
attention rank bitwise equal to the reference by construction.

Pure: no I/O, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.model.config import ModelConfig


class KVCacheError(Exception):
    """Base of KV cache refusals (the message says what and why)."""


class KVBudgetExceeded(KVCacheError):
    """Not enough free blocks for the capacity asked."""


class UnknownSequence(KVCacheError):
    """A request id this rank holds no KV for."""


class BadKV(KVCacheError):
    """KV handed to ``adopt`` does not fit the model or the reserved capacity."""


@dataclass(slots=True)
class SequenceKV:
    request_id: str
    capacity: int                               # positions reserved
    blocks: int                                 # blocks charged to the budget
    kv: list[tuple[np.ndarray, np.ndarray]]     # per layer: K, V [Hkv, capacity, D]
    filled: int = 0                             # positions 0..filled-1 hold valid KV


class KVCache:
    def __init__(self, cfg: ModelConfig, *, budget_blocks: int, block_size: int) -> None:
        if budget_blocks < 1 or block_size < 1:
            raise ValueError(f"budget_blocks {budget_blocks} and block_size {block_size} must be >= 1")
        self.cfg = cfg
        self.budget_blocks = budget_blocks
        self.block_size = block_size
        self.used_blocks = 0
        self._seqs: dict[str, SequenceKV] = {}

    # ---------------------------------------------------------------- accounting
    def blocks_for(self, capacity: int) -> int:
        return -(-capacity // self.block_size)

    @property
    def free_blocks(self) -> int:
        return self.budget_blocks - self.used_blocks

    def __len__(self) -> int:
        return len(self._seqs)

    def request_ids(self) -> list[str]:
        return list(self._seqs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seqs

    def get(self, request_id: str) -> SequenceKV:
        try:
            return self._seqs[request_id]
        except KeyError:
            raise UnknownSequence(f"no KV for request {request_id!r} on this rank") from None

    def check_room(self, request_id: str, capacity: int) -> int:
        """Blocks ``allocate(request_id, capacity)`` would take; ``KVBudgetExceeded`` if they do
        not fit (a sequence being replaced gives its blocks back first)."""
        if not 1 <= capacity <= self.cfg.max_position_embeddings:
            raise KVBudgetExceeded(f"capacity {capacity} outside 1..{self.cfg.max_position_embeddings} positions")
        old = self._seqs.get(request_id)
        need = self.blocks_for(capacity)
        have = self.free_blocks + (old.blocks if old else 0)
        if need > have:
            raise KVBudgetExceeded(f"request {request_id!r} needs {need} KV blocks, {have} free "
                                   f"of {self.budget_blocks}")
        return need

    # ---------------------------------------------------------------- lifecycle
    def allocate(self, request_id: str, capacity: int) -> SequenceKV:
        """Reserve ``capacity`` positions (zeroed). A request id already held is replaced
        (a master re-sending Load after a timeout gets a fresh, consistent sequence)."""
        need = self.check_room(request_id, capacity)
        old = self._seqs.get(request_id)
        if old is not None:
            self._drop(old)
        shape = (self.cfg.num_key_value_heads, capacity, self.cfg.head_dim)
        seq = SequenceKV(request_id, capacity, need,
                         [(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                          for _ in range(self.cfg.num_hidden_layers)])
        self._seqs[request_id] = seq
        self.used_blocks += need
        return seq

    def adopt(self, request_id: str, kv: Sequence[tuple[np.ndarray, np.ndarray]], num_tokens: int,
              capacity: int) -> SequenceKV:
        """Allocate and copy in the KV of positions ``0..num_tokens-1`` (per layer ``[Hkv, n, D]``)."""
        cfg = self.cfg
        want = (cfg.num_key_value_heads, num_tokens, cfg.head_dim)
        if not 1 <= num_tokens < capacity:
            raise BadKV(f"{num_tokens} KV positions for a capacity of {capacity} (need 1..capacity-1: "
                        f"decode writes at least one more)")
        if len(kv) != cfg.num_hidden_layers:
            raise BadKV(f"KV for {len(kv)} layers, the model has {cfg.num_hidden_layers}")
        for li, (k, v) in enumerate(kv):
            for name, a in (("K", k), ("V", v)):
                if a.dtype != np.float32 or a.shape[0] != want[0] or a.shape[2] != want[2] \
                        or a.shape[1] < num_tokens:
                    raise BadKV(f"layer {li} {name} is {a.dtype}{a.shape}, expected float32{want}")
        seq = self.allocate(request_id, capacity)
        for (dk, dv), (k, v) in zip(seq.kv, kv):
            dk[:, :num_tokens] = k[:, :num_tokens]
            dv[:, :num_tokens] = v[:, :num_tokens]
        seq.filled = num_tokens
        return seq

    def free(self, request_ids: Iterable[str]) -> list[str]:
        """Free the given sequences; returns the ids that were not held."""
        unknown = []
        for rid in request_ids:
            seq = self._seqs.get(rid)
            if seq is None:
                unknown.append(rid)
            else:
                self._drop(seq)
        return unknown

    def _drop(self, seq: SequenceKV) -> None:
        del self._seqs[seq.request_id]
        self.used_blocks -= seq.blocks
