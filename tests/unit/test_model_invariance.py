"""The invariance rules of services/model/layers.py, checked bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.model import layers as L
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode

PROMPTS = [
    "Hello, world", "The quick brown fox jumps over the lazy dog", "a", "MoE routes tokens",
    "CloudMatrix384 SuperPod", "xDeepServe", "disaggregated prefill and decode", "0123456789" * 3,
    "Ünïcödé ✓", "short", "attention and experts live on different ranks", "zz",
    "The KV cache moves over the unified bus", "tokens must match", "batch invariance", "?",
]


@pytest.fixture(scope="module")
def tiny() -> ReferenceEngine:
    return ReferenceEngine.from_preset("tiny", seed=0)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), k=st.sampled_from([16, 64, 72, 512]), n=st.sampled_from([8, 64, 259, 520]),
       seed=st.integers(0, 2**16))
def test_linear_row_is_independent_of_batch(m: int, k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    full = L.linear(x, w)
    i = int(rng.integers(0, m))
    alone = L.linear(x[i:i + 1], w)
    assert np.array_equal(alone[0], full[i])
    # Same row with other companions, at another position.
    other = rng.standard_normal((m + 3, k)).astype(np.float32)
    other[m + 2 - i % 3] = x[i]
    assert np.array_equal(L.linear(other, w)[m + 2 - i % 3], full[i])
    # And close to the plain product (it is a GEMM, just a fixed-shape one).
    np.testing.assert_allclose(full, x @ w, rtol=1e-4, atol=1e-4)


def test_alone_equals_inside_batch_of_16_greedy_64(tiny: ReferenceEngine) -> None:
    reqs = [GenerationRequest(f"r{i}", tuple(encode(p)), SamplingParams(max_tokens=64, stop_token_ids=()))
            for i, p in enumerate(PROMPTS)]
    batch = tiny.generate(reqs)
    assert len({r.token_ids for r in batch}) > 8, "prompts should give different continuations"
    for i in (0, 3, 7, 15):
        alone = tiny.generate([reqs[i]])[0]
        assert alone.token_ids == batch[i].token_ids
        assert len(alone.token_ids) == 64


def test_seeded_sampling_alone_equals_in_batch(tiny: ReferenceEngine) -> None:
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, stop_token_ids=()),
              SamplingParams(temperature=1.3, top_k=20, max_tokens=24, stop_token_ids=())]
    reqs = [GenerationRequest(f"s{i}", tuple(encode(p)), params[i % 2]) for i, p in enumerate(PROMPTS[:8])]
    batch = tiny.generate(reqs)
    for i in (0, 1, 6):
        assert tiny.generate([reqs[i]])[0].token_ids == batch[i].token_ids
    # Unseeded requests draw from their request id: renaming changes the draw.
    renamed = GenerationRequest("other-id", reqs[1].prompt_ids, reqs[1].params)
    assert tiny.generate([renamed])[0].token_ids != batch[1].token_ids


def test_prefix_then_suffix_equals_full_prefill(tiny: ReferenceEngine) -> None:
    """What the KV pool's prefix cache relies on: computing only the suffix gives the same bits."""
    cfg = tiny.cfg
    prompt = tuple(encode("a prompt whose prefix is cached in the KV pool"))
    req = GenerationRequest("p", prompt, SamplingParams(max_tokens=4))
    full = SequenceState(req, new_kv(cfg, 64))
    logits_full = forward(cfg, tiny.weights, tiny.rope, [(full, prompt)])
    for cut in (1, 7, 16, len(prompt) - 1):
        part = SequenceState(req, new_kv(cfg, 80))  # another capacity, too
        forward(cfg, tiny.weights, tiny.rope, [(part, prompt[:cut])])
        logits_part = forward(cfg, tiny.weights, tiny.rope, [(part, prompt[cut:])])
        assert np.array_equal(logits_part, logits_full)
        for (k1, v1), (k2, v2) in zip(full.kv, part.kv):
            assert np.array_equal(k1[:, :len(prompt)], k2[:, :len(prompt)])
            assert np.array_equal(v1[:, :len(prompt)], v2[:, :len(prompt)])
