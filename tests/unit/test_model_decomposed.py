"""The decomposed pieces, composed layer by layer with the experts computed separately in
arbitrary token groupings (as expert instances will), give exactly the monolithic result."""

from __future__ import annotations

import numpy as np
import pytest

from services.model import layers as L
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode


def _grouped(rng: np.random.Generator, rows: np.ndarray) -> list[np.ndarray]:
    """Shuffle rows and cut them into random groups (as different DP groups' batches would)."""
    rows = rng.permutation(rows)
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), size=min(len(rows) - 1, int(rng.integers(0, 4))),
                              replace=False)) if len(rows) > 1 else []
    return np.split(rows, cuts)


def disaggregated_forward(engine: ReferenceEngine, chunks, rng: np.random.Generator, n_instances: int = 4):
    cfg, w = engine.cfg, engine.weights
    ids = np.concatenate([np.asarray(t) for _, t in chunks])
    x = L.embed(w, ids)
    placement = rng.permutation(cfg.n_routed_experts) % n_instances  # expert -> instance
    for li, lw in enumerate(w.layers):
        segs = [L.Segment(s.kv[li][0], s.kv[li][1], s.computed, len(t)) for s, t in chunks]
        x = L.attention_block(cfg, lw.attn, engine.rope, x, segs)          # attention rank
        h = L.ffn_input(cfg, lw, x)
        if lw.dense is not None:
            x = x + L.ffn(lw.dense, h)
            continue
        topk, wts = L.gate(cfg, lw, h)                                     # attention rank: gate
        T, k = topk.shape
        expert_out = np.full((T, k, cfg.hidden_size), np.nan, dtype=np.float32)
        for inst in range(n_instances):                                    # each expert instance
            for e in np.nonzero(placement == inst)[0]:
                tok, slot = np.nonzero(topk == e)
                if not tok.size:
                    continue
                order = np.arange(tok.size)
                for grp in _grouped(rng, order):                           # arbitrary grouping
                    expert_out[tok[grp], slot[grp]] = L.ffn(lw.experts[e], h[tok[grp]])
        shared = np.empty_like(h)
        for grp in _grouped(rng, np.arange(T)):                           # shared expert, grouped too
            shared[grp] = L.ffn(lw.shared, h[grp])
        assert not np.isnan(expert_out).any()
        x = x + L.combine(expert_out, wts, shared)                        # E2A combine
    last = np.cumsum([len(t) for _, t in chunks]) - 1
    for s, t in chunks:
        s.computed += len(t)
    return L.final_logits(cfg, w, x[last])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_and_batched_decode_match_monolithic(seed: int) -> None:
    engine = ReferenceEngine.from_preset("tiny", seed=seed)
    rng = np.random.default_rng(seed)
    prompts = ["Hello", "mixture of experts", "a much longer prompt that spans many tokens " * 2, "x"]
    reqs = [GenerationRequest(f"r{i}", tuple(encode(p)), SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
    mono = [SequenceState(r, new_kv(engine.cfg, 128)) for r in reqs]
    dist = [SequenceState(r, new_kv(engine.cfg, 128)) for r in reqs]
    lm = forward(engine.cfg, engine.weights, engine.rope, [(s, s.req.prompt_ids) for s in mono])
    ld = disaggregated_forward(engine, [(s, s.req.prompt_ids) for s in dist], rng)
    assert np.array_equal(lm, ld)
    for step in range(8):
        toks = [int(np.argmax(row)) for row in lm]
        lm = forward(engine.cfg, engine.weights, engine.rope, [(s, [t]) for s, t in zip(mono, toks)])
        # Decode a different subset ordering on the distributed side: order must not matter.
        perm = rng.permutation(len(dist))
        ld_perm = disaggregated_forward(engine, [(dist[i], [toks[i]]) for i in perm], rng)
        ld = np.empty_like(ld_perm)
        ld[perm] = ld_perm
        assert np.array_equal(lm, ld), f"decode step {step} differs"


def test_experts_really_are_used_and_differ() -> None:
    """Guards the test above against a degenerate model (one expert for every token)."""
    engine = ReferenceEngine.from_preset("tiny", seed=0)
    h = np.random.default_rng(0).standard_normal((64, engine.cfg.hidden_size)).astype(np.float32)
    lw = engine.weights.layers[engine.cfg.first_k_dense_replace]
    ids, wts = L.gate(engine.cfg, lw, h)
    assert len(np.unique(ids)) == engine.cfg.n_routed_experts
    np.testing.assert_allclose(wts.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(L.ffn(lw.experts[0], h), L.ffn(lw.experts[1], h))
