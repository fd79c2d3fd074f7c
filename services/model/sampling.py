"""Sampling parameters and the sampler.

Determinism rule: the random draw for a token depends only on (seed, position) when the request
has a seed, else on (request id, position). The same request therefore yields the same tokens
whatever else is in the batch, on whichever DP group, and after a migration that replays it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from services.model.config import EOS_ID


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # (0, 1]; 1 = disabled
    top_k: int = 0                    # 0 = disabled
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = (EOS_ID,)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidSamplingParams(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidSamplingParams(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidSamplingParams(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise InvalidSamplingParams(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise InvalidSamplingParams(f"seed must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def request_key(request_id: str) -> int:
    """A stable 64-bit key of a request id (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def sample(logits: np.ndarray, params: SamplingParams, request_id: str, position: int) -> int:
    """Pick the token at ``position`` from one row of float32 logits."""
    if params.greedy:
        return int(np.argmax(logits))  # first index of the maximum
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    zs = z[order]
    p = np.exp(zs - zs[0])
    p /= p.sum()
    if params.top_p < 1.0:
        cum = np.cumsum(p)
        keep = int(np.searchsorted(cum, params.top_p, side="left")) + 1  # include the crossing token
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    key = params.seed if params.seed is not None else request_key(request_id)
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([key, position]))).random()
    idx = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return int(order[min(idx, len(order) - 1)])
