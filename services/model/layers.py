"""The decomposed MoE transformer: plain functions over numpy arrays.

The reference engine composes exactly these functions, and so do the services (attention rank,
MoE expert, decode master), which is what lets the disaggregated pod reproduce the monolithic
tokens bit for bit. The invariance rules that make that hold (measured on this machine's
OpenBLAS, see tests/unit/test_model_invariance.py):

1. Every GEMM goes through ``linear``, whose bits are defined by ``linear_tile8``: BLAS calls
   of exactly ``TILE`` = 8 rows (zero-padded). OpenBLAS picks kernels by problem size, so
   ``x[:3] @ w`` and ``x @ w`` give different bits for the same row; with a fixed 8-row call, a
   row's result depends neither on its position in the tile nor on the other rows.
   Speed without new bits: full tiles go to BLAS in one stacked ``matmul`` (numpy runs one gemm
   per stacked item, with the arguments of a separate 2-D call), and ``linear`` uses larger row
   tiles (``BIG_TILES``), and pads a short tail to fewer rows (``SMALL_TILES``), only for the
   weight shapes where a start-up probe (``tile_sizes``) shows them bit-identical to 8-row tiles
   on this machine's BLAS (the code path is chosen from shapes, never values), and faster. Shapes reject sizes: here 128/256-row tiles change the
   bits for 512x16 (the router) and 64/128/256 for 64x259 (tiny's lm_head); 16- and 32-row
   tiles were once seen *not* invariant on another machine.
2. BLAS runs single-threaded in every process (``pin_blas_threads``): the thread split changes
   the bits too. Costs ~2x GEMM throughput versus one big multi-threaded call.
3. Attention for a query at position p is computed alone, over exactly the keys 0..p, with
   the same call shapes in prefill and decode: prefill, decode, and prefill of a suffix after
   a cached prefix all give the same bits.
4. Reductions (RMSNorm mean, softmax sums) run along a contiguous last axis, per row.
5. Combine adds the k routed contributions in slot order j = 0..k-1, then the shared expert:
   the result does not depend on how tokens were grouped for the experts.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from services.model.config import ModelConfig
from services.model.weights import AttentionWeights, FFNWeights, LayerWeights, ModelWeights

_pinned = False


def pin_blas_threads() -> None:
    """Rule 2: one BLAS thread in this process (idempotent)."""
    global _pinned
    if not _pinned:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
        _pinned = True


pin_blas_threads()


TILE = 8
# Larger row tiles tried per weight shape (rule 1); each is used only where it gives the same bits.
BIG_TILES = (256, 128, 64, 32, 16)
# Smaller calls for a tail of at most that many rows (zero-padded to it), tried the same way:
# OpenBLAS runs few-row calls of some shapes in a kernel several times faster than its 8-row
# one (256x512: 9 us for 2 rows against 32 us for 8), with the same bits for some shapes only.
SMALL_TILES = (4, 2)
_PROBE_ROWS = max(BIG_TILES)
_tiles_for: dict[tuple, tuple[int, ...]] = {}
_fast = True


@contextmanager
def original_paths() -> Iterator[None]:
    """Run with the original (slower, same-bits) paths inside: 8-row tiles only, per-query
    prefill attention. For before/after benchmarks (services/bench/reference.py); a module
    switch, so not for concurrent use."""
    global _fast
    saved, _fast = _fast, False
    try:
        yield
    finally:
        _fast = saved


def _matmul_tiles(x: np.ndarray, w: np.ndarray, out: np.ndarray, sizes: tuple[int, ...]) -> None:
    """``out = x @ w`` by row tiles: as many tiles of each size in ``sizes`` (largest first, last
    ``TILE``) as fit, each size in one stacked ``matmul``; the rest zero-padded to ``TILE`` rows
    (or to 16 if there are more than 8 and 16-row tiles are allowed).

    numpy runs a stacked matmul as one gemm call per stacked item, with the arguments of a
    separate 2-D call (numpy/_core/src/umath/matmul.c.src, the same loop in 1.26 and 2.x).
    """
    m, k = x.shape
    n = w.shape[1]
    i = 0
    for t in sizes:
        if t < TILE or (t == TILE and m - i > TILE and 2 * TILE in sizes):
            break  # 9..15 rows left: one zero-padded 16-row call costs less than two 8-row ones
        cnt = (m - i) // t
        if cnt == 1:
            np.matmul(x[i:i + t], w, out=out[i:i + t])
        elif cnt:
            np.matmul(x[i:i + cnt * t].reshape(cnt, t, k), w, out=out[i:i + cnt * t].reshape(cnt, t, n))
        i += cnt * t
    if i < m:
        left = m - i
        rows = TILE if left <= TILE else 2 * TILE
        for t in sizes[::-1]:   # the smallest proven tail tile that holds what is left
            if t >= TILE:
                break
            if left <= t:
                rows = t
                break
        pad = np.zeros((rows, k), dtype=np.float32)
        pad[:left] = x[i:]
        out[i:] = (pad @ w)[:left]


def linear_tile8(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The definition of ``linear``'s bits: every row computed in an 8-row BLAS call (rule 1)."""
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    out = np.empty((x.shape[0], w.shape[1]), dtype=np.float32)
    _matmul_tiles(x, w, out, (TILE,))
    return out


def _best_of_3(fn) -> tuple[float, np.ndarray]:
    best, res = float("inf"), None
    for _ in range(3):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def _calibrate(w: np.ndarray) -> tuple[int, ...]:
    """The tile sizes of BIG_TILES whose rows equal 8-row tiles bit for bit for w's shape and
    layout, and that are faster than 8-row tiles for it.

    BLAS picks its code path (small-matrix kernel, edge kernels, K blocking) from the call's
    shapes and layout only, never from the values, so one random probe over every row position
    of the tile decides for every input of that shape: a different summation order would show
    in practically every one of the probe's ``T * N`` outputs. Speed decides only among sizes
    with equal bits (small weights run 8-row calls through OpenBLAS's fast small-matrix kernel,
    where bigger tiles are slower), so a noisy timing can cost speed, never exactness.
    """
    k, n = w.shape
    rng = np.random.default_rng(k * 7919 + n)
    probe_w = np.empty_like(w, order="K")
    probe_w[...] = rng.standard_normal((k, n), dtype=np.float32)
    probe_x = rng.standard_normal((_PROBE_ROWS, k), dtype=np.float32)
    t8, want = _best_of_3(lambda: linear_tile8(probe_x, probe_w))
    ok = []
    for t in BIG_TILES:
        tt, got = _best_of_3(lambda: np.matmul(probe_x.reshape(-1, t, k), probe_w))
        if np.array_equal(got.reshape(_PROBE_ROWS, n), want) and tt < 0.95 * t8:
            ok.append(t)
    # A tail of at most t rows padded to t (instead of 8): every row position of the probe, each
    # with random companions as well as with the zero padding a short tail has.
    one8, _ = _best_of_3(lambda: probe_x[:TILE] @ probe_w)
    for t in SMALL_TILES:
        tt, _ = _best_of_3(lambda: probe_x[:t] @ probe_w)
        if tt >= 0.8 * one8:
            continue
        full = np.matmul(probe_x.reshape(-1, t, k), probe_w).reshape(_PROBE_ROWS, n)
        pad = np.zeros((t, k), dtype=np.float32)
        pad[0] = probe_x[0]
        if np.array_equal(full, want) and np.array_equal((pad @ probe_w)[0], want[0]):
            ok.append(t)
    return tuple(sorted(ok, reverse=True))


def tile_sizes(w: np.ndarray) -> tuple[int, ...]:
    """Row tiles ``linear`` uses for weights shaped and laid out like ``w``, largest first: the
    ``BIG_TILES`` proven equal by ``_calibrate``, ``TILE``, then the ``SMALL_TILES`` proven equal
    (for a short tail only)."""
    key = (w.shape, w.strides)
    sizes = _tiles_for.get(key)
    if sizes is None:
        contiguous = w.flags.c_contiguous or w.flags.f_contiguous
        proven = _calibrate(w) if contiguous and w.dtype == np.float32 else ()
        sizes = (*(t for t in proven if t > TILE), TILE, *(t for t in proven if t < TILE))
        _tiles_for[key] = sizes
    return sizes


def warm_tiles(w: ModelWeights) -> None:
    """Run ``tile_sizes``'s probe for every weight shape of the model now (a few ms per shape)
    rather than inside the first large request."""
    mats = [w.lm_head]
    for lw in w.layers:
        mats += [lw.attn.wq, lw.attn.wk, lw.attn.wv, lw.attn.wo]
        mats += [m for m in (lw.router,) if m is not None]
        for f in [lw.dense, lw.shared, *lw.experts]:
            if f is not None:
                mats += [f.gate, f.up, f.down]
    for m in mats:
        tile_sizes(m)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w`` with the bits of ``linear_tile8`` (rule 1), in the largest row tiles proven equal.

    Rows go greedily to the largest allowed tile (``tile_sizes``), then to 8-row tiles, the
    leftover zero-padded (to the smallest proven small tile that holds it, else to 8 rows, or
    16): a row's bits depend neither on its position nor on the batch.
    """
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    m = x.shape[0]
    out = np.empty((m, w.shape[1]), dtype=np.float32)
    _matmul_tiles(x, w, out, tile_sizes(w) if _fast else (TILE,))
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(var + np.float32(eps)))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


@dataclass(frozen=True, slots=True)
class Rope:
    cos: np.ndarray  # [max_pos, D/2]
    sin: np.ndarray

    @classmethod
    def build(cls, cfg: ModelConfig) -> Rope:
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(half, dtype=np.float64) / half))
        ang = np.outer(np.arange(cfg.max_position_embeddings, dtype=np.float64), inv_freq)
        return cls(np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: [T, heads, D]; rotate-half convention (HF Llama/DeepSeek)."""
        half = x.shape[-1] // 2
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@dataclass(slots=True)
class Segment:
    """Rows ``start .. start+n-1`` of one sequence inside a batch, with that sequence's KV
    for this layer: arrays ``[num_kv_heads, capacity, head_dim]`` written in place."""
    k: np.ndarray
    v: np.ndarray
    start: int
    n: int


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: np.float32) -> np.ndarray:
    """Queries over their keys (rule 3). q: [..., Hkv, g, D]; k, v: [..., Hkv, L, D].

    A leading batch axis (queries of several sequences that all have L keys) gives each query
    the bits it gets alone: numpy's matmul makes one BLAS call per (query, head) item with the
    arguments of the lone call, the element-wise ops are per element, and max/sum reduce each
    row's L contiguous values alike (tests/unit/test_attention_groups.py).
    """
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    p = e / e.sum(axis=-1, keepdims=True)
    return np.matmul(p, v)


def _attend_grouped(q: np.ndarray, out: np.ndarray, segs: Sequence[tuple[int, Segment]],
                    scale: np.float32) -> None:
    """Prefill of several sequences: the queries with the same number of keys L, one per
    sequence, go through ``_attend`` together (one Python round per L instead of one per query).

    The segments' KV (rows 0..start+n-1) is first copied once into one stacked array, so that a
    group covering every segment is a plain view ``[:, :, :L]``.
    """
    _, Hq, D = q.shape
    Hkv = segs[0][1].k.shape[0]
    g = Hq // Hkv
    S = len(segs)
    lmax = max(s.start + s.n for _, s in segs)
    kall = np.zeros((S, Hkv, lmax, D), dtype=np.float32)
    vall = np.zeros((S, Hkv, lmax, D), dtype=np.float32)
    by_len: dict[int, tuple[list[int], list[int]]] = {}  # L -> (segment indices, rows)
    for b, (r0, s) in enumerate(segs):
        end = s.start + s.n
        kall[b, :, :end] = s.k[:, :end]
        vall[b, :, :end] = s.v[:, :end]
        for i in range(s.n):
            idx, rows = by_len.setdefault(s.start + i + 1, ([], []))
            idx.append(b)
            rows.append(r0 + i)
    for L, (idx, rows) in by_len.items():
        if len(idx) == S:
            ks, vs = kall[:, :, :L], vall[:, :, :L]
        elif len(idx) == 1:
            ks, vs = kall[idx[0]:idx[0] + 1, :, :L], vall[idx[0]:idx[0] + 1, :, :L]
        else:
            ks, vs = kall[idx, :, :L], vall[idx, :, :L]
        o = _attend(q[rows].reshape(len(rows), Hkv, g, D), ks, vs, scale)
        out[rows] = o.reshape(len(rows), Hq * D)


def attention_block(cfg: ModelConfig, w: AttentionWeights, rope: Rope, x: np.ndarray,
                    segments: Sequence[Segment]) -> np.ndarray:
    """Pre-norm self-attention with residual: returns ``x + o_proj(attn(norm(x)))``.

    Rows of ``x`` are the segments' tokens, concatenated in order. New keys/values are written
    into each segment's KV arrays at positions ``start .. start+n-1``. Multi-token segments
    (prefill chunks) of several sequences are attended in groups of equal key count
    (``_attend_grouped``); single tokens (decode) one by one over their own KV arrays.
    """
    T = x.shape[0]
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = Hq // Hkv
    positions = np.concatenate([np.arange(s.start, s.start + s.n) for s in segments]) if segments \
        else np.zeros(0, dtype=np.int64)
    if positions.shape[0] != T:
        raise ValueError(f"segments cover {positions.shape[0]} rows, x has {T}")
    h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
    q = rope.apply(linear(h, w.wq).reshape(T, Hq, D), positions)
    k = rope.apply(linear(h, w.wk).reshape(T, Hkv, D), positions)
    v = linear(h, w.wv).reshape(T, Hkv, D)
    scale = np.float32(1.0 / np.sqrt(D))
    out = np.empty((T, Hq * D), dtype=np.float32)
    row = 0
    multi: list[tuple[int, Segment]] = []
    for s in segments:
        s.k[:, s.start:s.start + s.n] = k[row:row + s.n].transpose(1, 0, 2)
        s.v[:, s.start:s.start + s.n] = v[row:row + s.n].transpose(1, 0, 2)
        if s.n > 1:
            multi.append((row, s))
        row += s.n
    if len(multi) < 2 or not _fast:
        multi = []
    grouped = {id(s) for _, s in multi}
    row = 0
    for s in segments:
        if id(s) not in grouped:
            for i in range(s.n):
                L = s.start + i + 1
                o = _attend(q[row + i].reshape(Hkv, g, D), s.k[:, :L], s.v[:, :L], scale)
                out[row + i] = o.reshape(Hq * D)
        row += s.n
    if multi:
        _attend_grouped(q, out, multi, scale)
    return x + linear(out, w.wo)


def ffn_input(cfg: ModelConfig, lw: LayerWeights, x: np.ndarray) -> np.ndarray:
    """The normed hidden state that feeds the dense FFN or the gate + experts."""
    return rms_norm(x, lw.post_norm, cfg.rms_norm_eps)


def ffn(w: FFNWeights, h: np.ndarray) -> np.ndarray:
    """SwiGLU FFN: one routed expert, the shared expert, or a dense layer's MLP."""
    return linear(silu(linear(h, w.gate)) * linear(h, w.up), w.down)


def gate(cfg: ModelConfig, lw: LayerWeights, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing: (expert ids [T, k] int32, weights [T, k] float32), slot order = rank."""
    assert lw.router is not None, "gate() on a dense layer"
    logits = linear(h, lw.router)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    k = cfg.num_experts_per_tok
    # Stable sort: ties go to the lower expert id, the same everywhere.
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k].astype(np.int32)
    wts = np.take_along_axis(probs, ids, axis=-1)
    if cfg.norm_topk_prob:
        wts = wts / wts.sum(axis=-1, keepdims=True)
    return ids, (wts * np.float32(cfg.routed_scaling_factor)).astype(np.float32)


def combine(expert_out: np.ndarray, weights: np.ndarray, shared_out: np.ndarray | None) -> np.ndarray:
    """MoE output (rule 5). expert_out: [T, k, H] in slot order; weights: [T, k]."""
    acc = weights[:, 0:1] * expert_out[:, 0]
    for j in range(1, expert_out.shape[1]):
        acc = acc + weights[:, j:j + 1] * expert_out[:, j]
    return acc if shared_out is None else acc + shared_out


def run_experts_grouped(lw: LayerWeights, h: np.ndarray, ids: np.ndarray,
                        expert_ids: Sequence[int] | None = None) -> np.ndarray:
    """Compute every (token, slot) routed expert output, grouping tokens per expert.

    Returns [T, k, H]. ``expert_ids`` restricts to a subset (others left zero): an expert
    instance computes its own experts only.
    """
    T, k = ids.shape
    out = np.zeros((T, k, h.shape[1]), dtype=np.float32)
    for e in (range(len(lw.experts)) if expert_ids is None else expert_ids):
        tok, slot = np.nonzero(ids == e)
        if tok.size:
            out[tok, slot] = ffn(lw.experts[e], h[tok])
    return out


def moe_block(cfg: ModelConfig, lw: LayerWeights, x: np.ndarray) -> np.ndarray:
    """Residual FFN part of a layer, monolithic: x + FFN(norm(x)) (dense or MoE)."""
    h = ffn_input(cfg, lw, x)
    if lw.dense is not None:
        return x + ffn(lw.dense, h)
    ids, wts = gate(cfg, lw, h)
    shared = ffn(lw.shared, h) if lw.shared is not None else None
    return x + combine(run_experts_grouped(lw, h, ids), wts, shared)


def embed(w: ModelWeights, token_ids: np.ndarray) -> np.ndarray:
    return w.embed[np.asarray(token_ids, dtype=np.int64)]


def final_logits(cfg: ModelConfig, w: ModelWeights, x: np.ndarray) -> np.ndarray:
    """Final RMSNorm + lm_head: [T, H] -> [T, V]."""
    return linear(rms_norm(x, w.norm, cfg.rms_norm_eps), w.lm_head)
