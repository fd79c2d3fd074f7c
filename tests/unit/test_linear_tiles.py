"""The faster ``linear`` keeps the bits of the original 8-row implementation, kept here verbatim
(larger tiles, and short tails padded to fewer rows, only where the probe proved them equal).

``original_linear`` is the oracle: ``layers.linear`` (stacked calls, larger tiles where the
start-up probe proves them equal) must give the same bits for every row, every batch size and
every row position, and the reference engine must give the same logits, KV and tokens with
either implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.model import layers as L
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode


def original_linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``layers.linear`` before the change (commit f0115e7), one 8-row BLAS call per tile."""
    m = x.shape[0]
    out = np.empty((m, w.shape[1]), dtype=np.float32)
    full = m - m % 8
    for i in range(0, full, 8):
        np.matmul(x[i:i + 8], w, out=out[i:i + 8])
    if full < m:
        pad = np.zeros((8, x.shape[1]), dtype=np.float32)
        pad[: m - full] = x[full:]
        out[full:] = (pad @ w)[: m - full]
    return out


# The model's weight shapes (tiny and small presets) and a few odd ones.
SHAPES = [(64, 64), (64, 32), (64, 8), (32, 64), (64, 259), (512, 512), (512, 256), (512, 16),
          (256, 512), (512, 1536), (1536, 512), (512, 259), (72, 520), (16, 8), (300, 7)]


@settings(max_examples=80, deadline=None)
@given(shape=st.sampled_from(SHAPES), m=st.integers(1, 600), seed=st.integers(0, 2**16),
       fortran=st.booleans())
def test_linear_equals_original_for_every_row(shape: tuple[int, int], m: int, seed: int,
                                              fortran: bool) -> None:
    rng = np.random.default_rng(seed)
    k, n = shape
    w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.05)
    if fortran:
        w = np.asfortranarray(w)
    x = rng.standard_normal((m, k), dtype=np.float32)
    want = original_linear(x, w)
    assert np.array_equal(L.linear(x, w), want)
    assert np.array_equal(L.linear_tile8(x, w), want)
    # A row alone and at another position in a different batch.
    i = int(rng.integers(0, m))
    assert np.array_equal(L.linear(x[i:i + 1], w)[0], want[i])
    j = int(rng.integers(0, m + 37))
    other = rng.standard_normal((m + 37, k), dtype=np.float32)
    other[j] = x[i]
    assert np.array_equal(L.linear(other, w)[j], want[i])


@pytest.mark.parametrize("k,n", [(512, 256), (64, 259), (16, 8)])
def test_every_row_count_up_to_300(k: int, n: int) -> None:
    """Every mix of tiles: greedy big tiles, 8-row tiles, the tail padded to 8 or to 16."""
    rng = np.random.default_rng(k * n)
    w = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal((300, k), dtype=np.float32)
    want = original_linear(x, w)
    for m in range(1, 301):
        assert np.array_equal(L.linear(x[300 - m:], w), want[300 - m:]), m


@pytest.mark.parametrize("k,n", [(64, 64), (512, 1536), (512, 259), (1536, 512)])
@pytest.mark.parametrize("rows", [8, 16, 64])
def test_stacked_matmul_is_one_blas_call_per_item(k: int, n: int, rows: int) -> None:
    """What linear relies on: numpy runs ``a.reshape(-1, r, k) @ w`` as one gemm per item,
    exactly like separate 2-D calls (numpy's matmul loop never folds the stack into one GEMM)."""
    rng = np.random.default_rng(k + n + rows)
    w = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal((rows * 9, k), dtype=np.float32)
    stacked = np.matmul(x.reshape(9, rows, k), w).reshape(rows * 9, n)
    separate = np.concatenate([x[i:i + rows] @ w for i in range(0, rows * 9, rows)])
    assert np.array_equal(stacked, separate)


@pytest.mark.parametrize("k,n", [(512, 259), (256, 512), (512, 16)])
def test_tile_sizes_are_proven_and_cached(k: int, n: int) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((k, n), dtype=np.float32)
    sizes = L.tile_sizes(w)
    assert L.TILE in sizes and set(sizes) <= {*L.BIG_TILES, L.TILE, *L.SMALL_TILES}
    assert list(sizes) == sorted(sizes, reverse=True)
    assert L.tile_sizes(w.copy()) is sizes  # one probe per shape and layout
    x = rng.standard_normal((L.BIG_TILES[0] * 2, k), dtype=np.float32)
    want = original_linear(x, w)
    for t in sizes:  # every accepted tile really gives the 8-row bits, at every position
        got = np.matmul(x.reshape(-1, t, k), w).reshape(want.shape)
        assert np.array_equal(got, want)
        if t < L.TILE:   # and a short tail padded to it with zeros, at every length
            for left in range(1, t + 1):
                pad = np.zeros((t, k), dtype=np.float32)
                pad[:left] = x[:left]
                assert np.array_equal((pad @ w)[:left], want[:left])
    # Neither contiguous layout: no probe, 8-row tiles only.
    assert L.tile_sizes(np.ones((40, 30), np.float32)[::2, ::3]) == (L.TILE,)


@pytest.fixture(scope="module", params=["tiny", "small"])
def engine(request: pytest.FixtureRequest) -> ReferenceEngine:
    return ReferenceEngine.from_preset(request.param, seed=0)


def _run(engine: ReferenceEngine) -> tuple[list[bytes], list[tuple[int, ...]]]:
    """Logits + KV of a mixed prefill batch and three decode steps, and greedy tokens."""
    cfg, rng = engine.cfg, np.random.default_rng(1)
    seqs, chunks = [], []
    for i, n in enumerate((1, 5, 8, 13, 70)):
        p = tuple(int(t) for t in rng.integers(0, 256, n))
        s = SequenceState(GenerationRequest(f"x{i}", p, SamplingParams(max_tokens=4)), new_kv(cfg, 80))
        seqs.append(s)
        chunks.append((s, p))
    blobs = [forward(cfg, engine.weights, engine.rope, chunks).tobytes()]
    for step in range(3):
        blobs.append(forward(cfg, engine.weights, engine.rope,
                             [(s, [step * 7 + j]) for j, s in enumerate(seqs)]).tobytes())
    blobs += [a.tobytes() for s in seqs for kv in s.kv for a in kv]
    reqs = [GenerationRequest(f"g{i}", tuple(encode(p)), SamplingParams(max_tokens=6, stop_token_ids=()))
            for i, p in enumerate(["Hello, world", "a", "MoE routes tokens across the pod " * 2])]
    return blobs, [r.token_ids for r in engine.generate(reqs)]


def test_engine_bits_equal_with_original_linear(engine: ReferenceEngine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    new_blobs, new_tokens = _run(engine)
    monkeypatch.setattr(L, "linear", original_linear)
    old_blobs, old_tokens = _run(engine)
    assert new_tokens == old_tokens
    assert len(new_blobs) == len(old_blobs)
    assert all(a == b for a, b in zip(new_blobs, old_blobs))
