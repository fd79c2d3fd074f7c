"""The attention rank's computation for one decode step, as a pure state machine.

A ``Step`` runs the layers of the model for a batch (one new token per sequence) and stops at
every MoE layer with a ``MoeCall`` (the normed hidden states, gate ids and weights) that the
server sends to the expert instances (A2E) and completes with their combined routed output
(E2A). No I/O and no asyncio here: the unit tests drive a ``Step`` with in-process experts.

Placement of the pieces of a layer, and why:
- attention, dense FFN layers, gate, embeddings, final norm and lm_head run here;
- routed experts never run here (``strip_routed_experts`` drops their weights at load);
- the shared expert runs here too: every token needs it (no routing), so shipping it to an
  expert instance would add bytes and a hop without balancing anything, and the server
  computes it while the routed experts are busy (``Step.compute_shared`` between dispatch and
  combine).

Exactness: the MoE output is ``x + (routed + shared)`` with ``routed`` the slot-ordered
weighted sum of ``dispatch_core.weighted_sum`` (``out = w0*y0; out += wj*yj``), the same IEEE
operations in the same order as ``layers.combine(expert_out, w, shared)`` in the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.attention.kvcache import KVCache, KVCacheError, SequenceKV
from services.model import layers as L
from services.model.config import ModelConfig
from services.model.weights import ModelWeights


class StepError(Exception):
    """A Run the rank refuses (bad peer input or state): nothing was modified."""


@dataclass(frozen=True, slots=True)
class MoeCall:
    """What one MoE layer needs from the experts: route ``h`` by (``ids``, ``weights``)."""
    layer: int
    h: np.ndarray          # [T, H] float32, the normed input of the experts
    ids: np.ndarray        # [T, k] int32, slot order
    weights: np.ndarray    # [T, k] float32


def strip_routed_experts(w: ModelWeights) -> ModelWeights:
    """The model without routed expert weights: an attention rank cannot compute them."""
    return dataclasses.replace(w, layers=tuple(dataclasses.replace(lw, experts=()) for lw in w.layers))


class Step:
    """One Run in progress. Use: ``while (call := step.advance()) is not None: ... step.complete(routed)``,
    then ``step.logits``. KV of the new positions is written into the cache as layers run."""

    def __init__(self, core: AttentionCore, seqs: Sequence[SequenceKV], tokens: np.ndarray,
                 positions: Sequence[int]) -> None:
        self._core = core
        self._seqs = seqs
        self._positions = list(positions)
        self._x = L.embed(core.weights, tokens)
        self._layer = 0
        self._pending: MoeCall | None = None
        self._shared: np.ndarray | None = None
        self.logits: np.ndarray | None = None

    @property
    def pending(self) -> MoeCall | None:
        return self._pending

    def advance(self) -> MoeCall | None:
        """Run layers up to the next MoE layer's gate (returned), or to the logits (None)."""
        if self._pending is not None:
            raise RuntimeError(f"layer {self._pending.layer} waits for its routed output")
        core, cfg, w = self._core, self._core.cfg, self._core.weights
        while self._layer < cfg.num_hidden_layers:
            li, lw = self._layer, w.layers[self._layer]
            segs = [L.Segment(s.kv[li][0], s.kv[li][1], p, 1) for s, p in zip(self._seqs, self._positions)]
            x = L.attention_block(cfg, lw.attn, core.rope, self._x, segs)
            h = L.ffn_input(cfg, lw, x)
            if lw.dense is not None:
                self._x = x + L.ffn(lw.dense, h)
                self._layer += 1
                continue
            ids, wts = L.gate(cfg, lw, h)
            self._x = x
            self._shared = None
            self._pending = MoeCall(li, h, ids, wts)
            return self._pending
        for s, p in zip(self._seqs, self._positions):
            s.filled = max(s.filled, p + 1)
        self.logits = L.final_logits(cfg, w, self._x)
        return None

    def compute_shared(self) -> None:
        """The shared expert of the pending layer (idempotent); call it while experts work."""
        call = self._pending
        if call is None:
            raise RuntimeError("no MoE layer pending")
        lw = self._core.weights.layers[call.layer]
        if self._shared is None and lw.shared is not None:
            self._shared = L.ffn(lw.shared, call.h)

    def complete(self, routed: np.ndarray) -> None:
        """Finish the pending MoE layer with the combined routed output [T, H]."""
        call = self._pending
        if call is None:
            raise RuntimeError("no MoE layer pending")
        if routed.shape != call.h.shape or routed.dtype != np.float32:
            raise StepError(f"routed output {routed.dtype}{routed.shape} for layer {call.layer}, "
                            f"expected float32{call.h.shape}")
        self.compute_shared()
        moe = routed if self._shared is None else routed + self._shared
        self._x = self._x + moe
        self._pending = None
        self._shared = None
        self._layer += 1


class AttentionCore:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, cache: KVCache, *, max_batch: int) -> None:
        if any(lw.experts for lw in weights.layers):
            raise ValueError("an attention rank must not hold routed experts (use strip_routed_experts)")
        self.cfg = cfg
        self.weights = weights
        self.cache = cache
        self.max_batch = max_batch
        self.rope = L.Rope.build(cfg)

    def start(self, request_ids: Sequence[str], tokens: Sequence[int], positions: Sequence[int]) -> Step:
        """Validate a Run completely before touching any state; ``StepError`` names the fault."""
        n = len(request_ids)
        if n == 0:
            raise StepError("empty batch")
        if n > self.max_batch:
            raise StepError(f"batch of {n} exceeds max_batch {self.max_batch}")
        if len(tokens) != n or len(positions) != n:
            raise StepError(f"{n} request ids, {len(tokens)} tokens, {len(positions)} positions")
        if len(set(request_ids)) != n:
            raise StepError("a request id appears twice in one step")
        seqs = []
        for rid, tok, pos in zip(request_ids, tokens, positions):
            try:
                seq = self.cache.get(rid)
            except KVCacheError as exc:
                raise StepError(str(exc)) from None
            if not 0 <= tok < self.cfg.vocab_size:
                raise StepError(f"request {rid!r}: token {tok} outside the vocabulary [0, {self.cfg.vocab_size})")
            # Positions 0..pos-1 must hold KV; re-running a position (a retried step) rewrites it.
            if not 0 <= pos <= seq.filled or pos >= seq.capacity:
                raise StepError(f"request {rid!r}: position {pos} with KV for 0..{seq.filled - 1} "
                                f"and capacity {seq.capacity}")
            seqs.append(seq)
        return Step(self, seqs, np.asarray(tokens, dtype=np.int64), positions)
