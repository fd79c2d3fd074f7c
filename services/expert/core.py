"""An expert instance's computation: the routed experts placed on it, per MoE layer. Pure.

The layer of an A2E event comes from its id (``unpack_event_id``); an event naming a dense
layer or a layer out of range is a peer violation (``CorruptMetadata``), counted by the
dispatch handler like any bad notice.
"""

from __future__ import annotations

import time

from collections.abc import Iterable

import numpy as np

from services.model import layers as L
from services.model.config import ModelConfig
from services.model.weights import FFNWeights, ModelWeights
from xccl_net.dispatch_core import ExpertFn, unpack_event_id
from xccl_net.errors import CorruptMetadata


class ExpertInstance:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, hosted: Iterable[int]) -> None:
        self.cfg = cfg
        self.hosted = frozenset(hosted)
        self.compute_s = 0.0  # time in expert FFNs (the step profile's "expert compute")
        self.tokens: dict[int, int] = dict.fromkeys(sorted(self.hosted), 0)  # rows computed, by expert id
        # layer -> expert id -> weights; only hosted experts of MoE layers are kept.
        self.experts: dict[int, dict[int, FFNWeights]] = {
            li: {e: lw.experts[e] for e in sorted(self.hosted)}
            for li, lw in enumerate(weights.layers) if cfg.is_moe_layer(li)}

    def select(self, event_id: int) -> ExpertFn:
        layer, _step, _attempt = unpack_event_id(event_id)
        table = self.experts.get(layer)
        if table is None:
            raise CorruptMetadata(f"event {event_id} names layer {layer}, not an MoE layer of this model "
                                  f"(MoE layers {self.cfg.moe_layers})")

        def expert_fn(e: int, rows: np.ndarray) -> np.ndarray:
            # The dispatch guard already refused expert ids not hosted here.
            t0 = time.perf_counter()
            out = L.ffn(table[e], rows)
            self.compute_s += time.perf_counter() - t0
            self.tokens[e] += len(rows)
            return out

        return expert_fn
