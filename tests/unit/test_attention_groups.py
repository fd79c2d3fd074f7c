"""Grouped prefill attention gives every query the bits of the per-query path (rule 3).

``original_attention_block`` is ``layers.attention_block`` before the change, kept verbatim as
the oracle: outputs and written KV must be equal bit for bit for any mix of segments.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.model import layers as L
from services.model.config import ModelConfig, preset
from services.model.weights import build_weights, init_tensors


def _attend_one(q, k, v, scale):
    s = np.matmul(q, k.transpose(0, 2, 1)) * scale
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    p = e / e.sum(axis=-1, keepdims=True)
    return np.matmul(p, v)


def original_attention_block(cfg, w, rope, x, segments):
    T = x.shape[0]
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = Hq // Hkv
    positions = np.concatenate([np.arange(s.start, s.start + s.n) for s in segments])
    h = L.rms_norm(x, w.input_norm, cfg.rms_norm_eps)
    q = rope.apply(L.linear(h, w.wq).reshape(T, Hq, D), positions)
    k = rope.apply(L.linear(h, w.wk).reshape(T, Hkv, D), positions)
    v = L.linear(h, w.wv).reshape(T, Hkv, D)
    scale = np.float32(1.0 / np.sqrt(D))
    out = np.empty((T, Hq * D), dtype=np.float32)
    row = 0
    for s in segments:
        s.k[:, s.start:s.start + s.n] = k[row:row + s.n].transpose(1, 0, 2)
        s.v[:, s.start:s.start + s.n] = v[row:row + s.n].transpose(1, 0, 2)
        for i in range(s.n):
            n_keys = s.start + i + 1
            o = _attend_one(q[row + i].reshape(Hkv, g, D), s.k[:, :n_keys], s.v[:, :n_keys], scale)
            out[row + i] = o.reshape(Hq * D)
        row += s.n
    return x + L.linear(out, w.wo)


CONFIGS = {
    "tiny": preset("tiny"),
    "small": preset("small"),
    "g1": ModelConfig(num_attention_heads=4, num_key_value_heads=4),  # gemv per item
    "g4": ModelConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=8),
}
_MODELS: dict[str, tuple] = {}


def _model(name: str) -> tuple:
    if name not in _MODELS:
        cfg = dataclass_replace_layers(CONFIGS[name])
        weights = build_weights(cfg, init_tensors(cfg, 0))
        _MODELS[name] = (cfg, weights.layers[0].attn, L.Rope.build(cfg))
    return _MODELS[name]


def dataclass_replace_layers(cfg: ModelConfig) -> ModelConfig:
    import dataclasses
    return dataclasses.replace(cfg, num_hidden_layers=1, first_k_dense_replace=1)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), seed=st.integers(0, 2**16),
       segs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 48), st.integers(0, 9)),
                     min_size=1, max_size=6),
       same=st.booleans())
def test_grouped_prefill_equals_per_query(name: str, seed: int, segs: list, same: bool) -> None:
    cfg, w, rope = _model(name)
    rng = np.random.default_rng(seed)
    if same:  # the common batched prefill: equal prompts lengths, all from position 0
        segs = [(0, segs[0][1], extra) for _, _, extra in segs]
    shape = (cfg.num_key_value_heads, 0, cfg.head_dim)
    new_segs, old_segs = [], []
    for start, n, extra in segs:
        cap = start + n + extra
        k = rng.standard_normal((shape[0], cap, shape[2]), dtype=np.float32)
        v = rng.standard_normal((shape[0], cap, shape[2]), dtype=np.float32)
        new_segs.append(L.Segment(k.copy(), v.copy(), start, n))
        old_segs.append(L.Segment(k.copy(), v.copy(), start, n))
    x = rng.standard_normal((sum(n for _, n, _ in segs), cfg.hidden_size), dtype=np.float32)
    got = L.attention_block(cfg, w, rope, x, new_segs)
    want = original_attention_block(cfg, w, rope, x, old_segs)
    assert np.array_equal(got, want)
    for a, b in zip(new_segs, old_segs):
        assert np.array_equal(a.k, b.k) and np.array_equal(a.v, b.v)


@pytest.mark.parametrize("g,D", [(1, 16), (2, 64), (4, 8)])
def test_attend_stacked_equals_alone_for_every_length(g: int, D: int) -> None:
    """The property _attend relies on, over key counts 1..300 (SIMD tails, pairwise-sum blocks)."""
    rng = np.random.default_rng(g * 100 + D)
    Hkv, B = 2, 5
    scale = np.float32(1.0 / np.sqrt(D))
    for n_keys in list(range(1, 40)) + [63, 64, 65, 127, 128, 129, 255, 256, 257, 300]:
        q = rng.standard_normal((B, Hkv, g, D), dtype=np.float32)
        k = rng.standard_normal((B, Hkv, n_keys + 3, D), dtype=np.float32)[:, :, :n_keys]
        v = rng.standard_normal((B, Hkv, n_keys, D), dtype=np.float32)
        stacked = L._attend(q, k, v, scale)
        for b in range(B):
            alone = _attend_one(q[b], k[b], v[b], scale)
            assert np.array_equal(stacked[b], alone), (n_keys, b)
