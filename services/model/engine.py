"""The monolithic reference engine: one process, batched prefill and decode with a KV cache.

It is the correctness oracle of the project: every distributed path is checked token for token
against it. It composes the functions of ``layers`` exactly as the services do.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from services.model import layers as L
from services.model import tokenizer
from services.model.config import ModelConfig, preset
from services.model.sampling import SamplingParams, sample
from services.model.weights import ModelWeights, build_weights, init_tensors, load_model

FinishReason = Literal["stop", "length"]


class InvalidRequest(ValueError):
    """A request the model cannot serve (empty or too long prompt, bad token id)."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True, slots=True)
class GenerationResult:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason

    def to_json(self) -> dict:
        return {"token_ids": list(self.token_ids), "text": self.text, "finish_reason": self.finish_reason}


def prompt_ids(text: str) -> tuple[int, ...]:
    """Tokenise a text prompt; an empty prompt is an error, not a BOS-only request."""
    if not text:
        raise InvalidRequest("prompt is empty")
    return tuple(tokenizer.encode(text))


def validate_request(cfg: ModelConfig, req: GenerationRequest) -> None:
    """Raise InvalidRequest naming what is wrong; shared by the engine and the router."""
    n = len(req.prompt_ids)
    if n == 0:
        raise InvalidRequest("prompt is empty")
    bad = next((t for t in req.prompt_ids if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    if n + req.params.max_tokens > cfg.max_position_embeddings:
        raise InvalidRequest(
            f"prompt ({n} tokens) + max_tokens ({req.params.max_tokens}) exceeds the model's "
            f"limit of {cfg.max_position_embeddings} positions")


@dataclass(slots=True)
class SequenceState:
    """A running sequence: its tokens so far and its per-layer KV arrays."""
    req: GenerationRequest
    kv: list[tuple[np.ndarray, np.ndarray]]
    output: list[int] = field(default_factory=list)
    computed: int = 0  # positions whose KV is in the cache
    finish: FinishReason | None = None

    @property
    def tokens(self) -> list[int]:
        return [*self.req.prompt_ids, *self.output]


def new_kv(cfg: ModelConfig, capacity: int) -> list[tuple[np.ndarray, np.ndarray]]:
    shape = (cfg.num_key_value_heads, capacity, cfg.head_dim)
    return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.num_hidden_layers)]


def forward(cfg: ModelConfig, w: ModelWeights, rope: L.Rope,
            chunks: Sequence[tuple[SequenceState, Sequence[int]]]) -> np.ndarray:
    """Run new tokens of several sequences through the model; logits of each chunk's last token.

    ``chunks`` pairs a sequence with the tokens to append at positions ``seq.computed ...``.
    """
    ids = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in chunks])
    x = L.embed(w, ids)
    for li, lw in enumerate(w.layers):
        segs = [L.Segment(s.kv[li][0], s.kv[li][1], s.computed, len(t)) for s, t in chunks]
        x = L.attention_block(cfg, lw.attn, rope, x, segs)
        x = L.moe_block(cfg, lw, x)
    last = np.cumsum([len(t) for _, t in chunks]) - 1
    for s, t in chunks:
        s.computed += len(t)
    return L.final_logits(cfg, w, x[last])


class ReferenceEngine:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, max_batch: int = 32) -> None:
        self.cfg, self.weights, self.max_batch = cfg, weights, max_batch
        self.rope = L.Rope.build(cfg)
        L.warm_tiles(weights)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **kw) -> ReferenceEngine:
        cfg = preset(name)
        return cls(cfg, build_weights(cfg, init_tensors(cfg, seed)), **kw)

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kw) -> ReferenceEngine:
        cfg, w = load_model(model_dir)
        return cls(cfg, w, **kw)

    def _start(self, req: GenerationRequest) -> SequenceState:
        validate_request(self.cfg, req)
        return SequenceState(req, new_kv(self.cfg, len(req.prompt_ids) + req.params.max_tokens))

    def _emit(self, s: SequenceState, logits: np.ndarray) -> None:
        pos = len(s.req.prompt_ids) + len(s.output)
        tok = sample(logits, s.req.params, s.req.request_id, pos)
        s.output.append(tok)
        if tok in s.req.params.stop_token_ids:
            s.finish = "stop"
        elif len(s.output) >= s.req.params.max_tokens:
            s.finish = "length"

    def prefill(self, seqs: Sequence[SequenceState]) -> None:
        logits = forward(self.cfg, self.weights, self.rope, [(s, s.req.prompt_ids) for s in seqs])
        for s, row in zip(seqs, logits):
            self._emit(s, row)

    def decode_step(self, seqs: Sequence[SequenceState]) -> None:
        logits = forward(self.cfg, self.weights, self.rope, [(s, s.output[-1:]) for s in seqs])
        for s, row in zip(seqs, logits):
            self._emit(s, row)

    def generate(self, requests: Sequence[GenerationRequest],
                 on_token: Callable[[str, int], None] | None = None) -> list[GenerationResult]:
        """Continuous batching: up to ``max_batch`` running; finished sequences make room."""
        for r in requests:
            validate_request(self.cfg, r)
        if len({r.request_id for r in requests}) != len(requests):
            raise InvalidRequest("request ids in one generate() call must be unique")
        waiting = deque(requests)
        running: list[SequenceState] = []
        done: dict[str, SequenceState] = {}
        while waiting or running:
            fresh = []
            while waiting and len(running) + len(fresh) < self.max_batch:
                fresh.append(self._start(waiting.popleft()))
            if fresh:
                self.prefill(fresh)
            old = [s for s in running]
            if old:
                self.decode_step(old)
            for s in fresh + old:
                if on_token is not None:
                    on_token(s.req.request_id, s.output[-1])
            running = [s for s in old + fresh if s.finish is None]
            for s in old + fresh:
                if s.finish is not None:
                    done[s.req.request_id] = s
        return [GenerationResult(r.request_id, tuple(done[r.request_id].output),
                                 tokenizer.decode(done[r.request_id].output),
                                 done[r.request_id].finish) for r in requests]
