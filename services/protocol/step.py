"""Decode master <-> attention rank messages, carried over XCCL send/recv (tensors inside).

One ``Run`` per decode step: the attention rank runs every layer for the batch (attention and
dense FFN locally; MoE layers through A2E/E2A with the expert instances) and answers with the
logits, which the master samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.wire import message
from services.protocol.inference import KVRef


@message("step.Load")
@dataclass(frozen=True, slots=True)
class Load:
    """Pull the KV of a newly admitted sequence from the pool into this rank's cache."""
    request_id: str
    kv: KVRef
    capacity: int                  # positions to reserve (prompt + max new tokens)
    master_epoch: str = ""         # the sending decode master's incarnation (see attention.server)


@message("step.Loaded")
@dataclass(frozen=True, slots=True)
class Loaded:
    request_id: str
    error: str = ""


@message("step.Run")
@dataclass(frozen=True, slots=True)
class Run:
    step: int
    request_ids: tuple[str, ...]
    tokens: tuple[int, ...]        # the token to feed, per sequence
    positions: tuple[int, ...]     # its position
    master_epoch: str = ""


@message("step.Logits")
@dataclass(frozen=True, slots=True)
class Logits:
    step: int
    logits: np.ndarray             # [batch, vocab] float32, rows in Run order
    error: str = ""


@message("step.Free")
@dataclass(frozen=True, slots=True)
class Free:
    request_ids: tuple[str, ...]
    master_epoch: str = ""
