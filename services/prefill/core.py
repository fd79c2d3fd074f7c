"""Prefill core (pure: numpy only): request checks and the batched forward pass.

The computation is exactly the reference engine's: a ``SequenceState`` whose per-layer KV
arrays hold the cached prefix (``computed = n_cached``) goes through ``engine.forward`` with
the remaining tokens, and the next token is sampled at position ``len(token_ids)``. The model
functions are row- and prefix-invariant (services/model/layers.py), so prefix + suffix and
any batching give the bits of a full, alone prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.model import layers as L
from services.model.config import ModelConfig
from services.model.engine import GenerationRequest, SequenceState, forward, new_kv
from services.model.sampling import InvalidSamplingParams, SamplingParams, sample
from services.model.weights import ModelWeights
from services.protocol.inference import Prefill

KV = list[tuple[np.ndarray, np.ndarray]]


class InvalidPrefill(ValueError):
    """A Prefill the model cannot serve; the message says what to change."""


def check(cfg: ModelConfig, msg: Prefill) -> SamplingParams:
    """Validate a peer's Prefill; returns its sampling parameters or raises InvalidPrefill.

    The position limit checked is the prefill's own (``len(token_ids) < max_positions``): on a
    migration replay ``token_ids`` already holds generated tokens, so ``len + max_tokens`` is
    not the request's real need; the decode master checks that at admission."""
    rid, ids = msg.request_id, msg.token_ids
    if not rid:
        raise InvalidPrefill("request_id is empty")
    if not ids:
        raise InvalidPrefill(f"{rid}: token_ids is empty (a prompt has at least one token)")
    if len(ids) >= cfg.max_position_embeddings:
        raise InvalidPrefill(f"{rid}: {len(ids)} tokens leave no position to sample: the model has "
                             f"{cfg.max_position_embeddings} positions")
    bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise InvalidPrefill(f"{rid}: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    if msg.position_offset not in (0, len(ids)):
        raise InvalidPrefill(f"{rid}: position_offset {msg.position_offset} must be len(token_ids) = {len(ids)} "
                             f"(the position of the token to sample) or 0 for the same")
    try:
        return msg.sampling.params()
    except InvalidSamplingParams as exc:
        raise InvalidPrefill(f"{rid}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Job:
    request_id: str
    tokens: tuple[int, ...]
    params: SamplingParams
    n_cached: int           # leading positions whose KV came from the pool (< len(tokens))
    cached_kv: KV           # per layer (k, v), each [Hkv, >= n_cached, D]

    def __post_init__(self) -> None:
        if not 0 <= self.n_cached < len(self.tokens):
            raise ValueError(f"{self.request_id}: n_cached {self.n_cached} must leave a token of {len(self.tokens)} "
                             f"to compute")

    @property
    def to_compute(self) -> int:
        return len(self.tokens) - self.n_cached


@dataclass(frozen=True, slots=True)
class Result:
    next_token: int
    kv: KV                  # per layer (k, v), [Hkv, len(tokens), D]: every position


class PrefillModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights) -> None:
        self.cfg, self.weights = cfg, weights
        self.rope = L.Rope.build(cfg)

    def start(self, j: Job) -> SequenceState:
        """The sequence a job's passes fill: KV for every position, the cached prefix copied in."""
        cfg = self.cfg
        kv = new_kv(cfg, len(j.tokens))
        if j.n_cached:
            if len(j.cached_kv) != cfg.num_hidden_layers:
                raise ValueError(f"{j.request_id}: cached KV has {len(j.cached_kv)} layers, "
                                 f"the model {cfg.num_hidden_layers}")
            for (k, v), (ck, cv) in zip(kv, j.cached_kv):
                k[:, :j.n_cached] = ck[:, :j.n_cached]
                v[:, :j.n_cached] = cv[:, :j.n_cached]
        return SequenceState(GenerationRequest(j.request_id, j.tokens, j.params), kv, computed=j.n_cached)

    def step(self, work: Sequence[tuple[Job, SequenceState, int]]) -> list[Result | None]:
        """One forward pass: ``n`` more positions of each job (a chunk, or the rest); a result
        for each job this pass completes, None for one that goes on in a later pass."""
        chunks = [(s, j.tokens[s.computed:s.computed + n]) for j, s, n in work]
        logits = forward(self.cfg, self.weights, self.rope, chunks)
        return [Result(sample(row, j.params, j.request_id, len(j.tokens)), s.kv) if s.computed == len(j.tokens)
                else None for (j, s, _), row in zip(work, logits)]

    def run(self, jobs: Sequence[Job]) -> list[Result]:
        """One forward pass over every job's uncached suffix; a result per job, in order."""
        results = self.step([(j, self.start(j), j.to_compute) for j in jobs])
        return [r for r in results if r is not None]


def plan_pass(left: Sequence[int], max_jobs: int, max_tokens: int) -> list[int]:
    """Positions each of the waiting jobs (FIFO; ``left``: positions each still has to compute)
    computes in the next pass: whole jobs while the request and token budgets allow; the job
    that does not fit the token budget takes the rest of it as a chunk and goes on in the next
    pass (chunked prefill: a long prompt never holds the queue behind it for more than a pass).
    At least one job, always at least one position."""
    out: list[int] = []
    budget = max_tokens
    for n in left:
        if len(out) >= max_jobs or budget <= 0:
            break
        take = min(n, budget)
        out.append(take)
        budget -= take
        if take < n:
            break
    return out
