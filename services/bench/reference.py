"""`xds bench reference`: prefill and decode throughput of the monolithic reference engine.

These are the numbers the pod is compared with. Ratios measured in the same run:
- decode batching gain (tokens/s at batch B over batch 1);
- the cost of the batch-invariant GEMM rule (single-thread BLAS calls with the bits of fixed
  8-row tiles) against a plain multi-threaded ``x @ w`` on the model's largest FFN shape, and
  the new ``linear`` against the original 8-row tiles (same bits);
- prefill/decode tokens/s of the new paths over the original ones (``layers.original_paths``:
  8-row tiles, per-query prefill attention), with a check that both gave the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np

from services.model import layers as L
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, new_kv
from services.model.sampling import SamplingParams



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    p.add_argument("--no-original", action="store_true",
                   help="skip the run on the original (8-row tile, per-query attention) paths")
    p.add_argument("--json", action="store_true")


def _sequences(engine: ReferenceEngine, batch: int, prompt_len: int, steps: int) -> list[SequenceState]:
    rng = np.random.default_rng(batch)
    seqs = []
    for i in range(batch):
        prompt = tuple(int(t) for t in rng.integers(0, 256, prompt_len))
        req = GenerationRequest(f"bench-{batch}-{i}", prompt, SamplingParams(max_tokens=steps + 1,
                                                                            stop_token_ids=()))
        seqs.append(SequenceState(req, new_kv(engine.cfg, prompt_len + steps + 1)))
    return seqs


def _timed(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _gemm_cost_ratio(engine: ReferenceEngine, m: int = 256, reps: int = 20) -> dict:
    """The batch-invariant ``linear`` against plain multi-threaded BLAS and against the original
    8-row tiles (same bits), on the model's largest FFN shape; plus new/original by row count."""
    from threadpoolctl import threadpool_limits

    cfg = engine.cfg
    w = engine.weights.layers[0].dense.gate if engine.weights.layers[0].dense is not None \
        else engine.weights.layers[0].attn.wq
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, w.shape[0])).astype(np.float32)
    tiled, orig, plain = [], [], []
    for _ in range(reps):  # alternating, best of each: load spikes hit all three alike
        tiled.append(_timed(lambda: L.linear(x, w), 1))
        with L.original_paths():
            orig.append(_timed(lambda: L.linear(x, w), 1))
        with threadpool_limits(os.cpu_count() or 1, user_api="blas"):
            plain.append(_timed(lambda: x @ w, 1))
    t_tiled, t_orig, t_plain = min(tiled), min(orig), min(plain)
    by_rows = {}
    for rows in (8, 13, 32, 64, 1024):  # best of alternating runs: these calls are short
        xr = rng.standard_normal((rows, w.shape[0])).astype(np.float32)
        t_new, t_old = [], []
        for _ in range(reps):
            t_new.append(_timed(lambda: L.linear(xr, w), 1))
            with L.original_paths():
                t_old.append(_timed(lambda: L.linear(xr, w), 1))
        by_rows[str(rows)] = min(t_old) / min(t_new)
    flops = 2.0 * m * w.shape[0] * w.shape[1]
    return {"shape": [m, int(w.shape[0]), int(w.shape[1])], "hidden": cfg.hidden_size,
            "row_tiles": list(L.tile_sizes(w)),
            "tiled_gflops": flops / t_tiled / 1e9, "original_tile8_gflops": flops / t_orig / 1e9,
            "plain_multithread_gflops": flops / t_plain / 1e9,
            "tiled_over_plain_throughput": t_plain / t_tiled,
            "original_tile8_over_plain_throughput": t_plain / t_orig,
            "new_over_original_throughput": t_orig / t_tiled,
            "new_over_original_by_rows": by_rows}


def _one_run(engine: ReferenceEngine, b: int, prompt_len: int, steps: int) -> tuple[list[float], list]:
    """(prefill wall s, decode wall s, prefill CPU s, decode CPU s), generated tokens."""
    seqs = _sequences(engine, b, prompt_len, steps)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.prefill(seqs)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.decode_step(seqs)
    t2, c2 = time.perf_counter(), time.process_time()
    return [t1 - t0, t2 - t1, c1 - c0, c2 - c1], [list(s.output) for s in seqs]


def _throughput(engine: ReferenceEngine, batch_sizes: list[int], prompt_len: int, steps: int,
                repeats: int, compare_original: bool) -> dict[str, tuple[dict, dict, dict]]:
    """Prefill and decode tokens/s per batch size, and the generated tokens, for the new paths
    and (if asked) the original ones; the two alternate run by run, so that load changes on the
    machine hit both alike."""
    paths = {"new": contextlib.nullcontext}
    if compare_original:
        paths["original"] = L.original_paths
    res: dict[str, tuple[dict, dict, dict]] = {name: ({}, {}, {}) for name in paths}
    for b in batch_sizes:
        times: dict[str, list[list[float]]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, ctx in paths.items():
                with ctx():
                    t, out = _one_run(engine, b, prompt_len, steps)
                times[name].append(t)
                res[name][2][str(b)] = out
        for name, runs in times.items():
            pm, dm, pc, dc = (statistics.median(col) for col in zip(*runs))
            res[name][0][str(b)] = {"tokens_per_s": b * prompt_len / pm, "median_s": pm, "cpu_s": pc}
            res[name][1][str(b)] = {"tokens_per_s": b * steps / dm, "step_ms": 1000 * dm / steps,
                                    "cpu_step_ms": 1000 * dc / steps}
    return res


def measure(preset: str, batch_sizes: list[int], prompt_len: int, steps: int, repeats: int,
            compare_original: bool = True) -> dict:
    engine = ReferenceEngine.from_preset(preset, seed=0, max_batch=max(batch_sizes))
    if prompt_len + steps + 1 > engine.cfg.max_position_embeddings:
        raise SystemExit(f"prompt-len + decode-steps exceeds the model's {engine.cfg.max_position_embeddings} positions")
    engine.prefill(_sequences(engine, 1, 8, 1))  # warm up allocations and code paths
    runs = _throughput(engine, batch_sizes, prompt_len, steps, repeats, compare_original)
    prefill, decode, tokens = runs["new"]
    lo, hi = str(min(batch_sizes)), str(max(batch_sizes))
    result = {
        "bench": "reference", "preset": preset, "prompt_len": prompt_len, "decode_steps": steps,
        "repeats": repeats, "cpus": os.cpu_count(), "prefill": prefill, "decode": decode,
        "ratios": {
            f"decode_tps_b{hi}_over_b{lo}": decode[hi]["tokens_per_s"] / decode[lo]["tokens_per_s"],
            f"prefill_tps_b{hi}_over_b{lo}": prefill[hi]["tokens_per_s"] / prefill[lo]["tokens_per_s"],
        },
    }
    if compare_original:
        # The same engine on the original paths (8-row tiles, per-query prefill attention):
        # same tokens, so the ratios are the speed bought by the new paths alone.
        o_pre, o_dec, o_tokens = runs["original"]
        result["original_paths"] = {"prefill": o_pre, "decode": o_dec, "same_tokens": o_tokens == tokens}
        for b in batch_sizes:
            result["ratios"][f"prefill_tps_new_over_original_b{b}"] = \
                prefill[str(b)]["tokens_per_s"] / o_pre[str(b)]["tokens_per_s"]
            result["ratios"][f"decode_tps_new_over_original_b{b}"] = \
                decode[str(b)]["tokens_per_s"] / o_dec[str(b)]["tokens_per_s"]
            # The same in CPU time (one BLAS thread): steadier when other work shares the cores.
            result["ratios"][f"prefill_cpu_original_over_new_b{b}"] = \
                o_pre[str(b)]["cpu_s"] / prefill[str(b)]["cpu_s"]
            result["ratios"][f"decode_cpu_original_over_new_b{b}"] = \
                o_dec[str(b)]["cpu_step_ms"] / decode[str(b)]["cpu_step_ms"]
    result["invariant_gemm"] = _gemm_cost_ratio(engine)
    return result


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    result = measure(args.preset, sizes, args.prompt_len, args.decode_steps, args.repeats,
                     compare_original=not args.no_original)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for b in sizes:
            print(f"batch {b:>3}: prefill {result['prefill'][str(b)]['tokens_per_s']:9.1f} tok/s   "
                  f"decode {result['decode'][str(b)]['tokens_per_s']:8.1f} tok/s", file=sys.stdout)
        for k, v in result["ratios"].items():
            print(f"{k}: {v:.2f}")
        g = result["invariant_gemm"]
        print(f"invariant GEMM / plain multithreaded: {g['tiled_over_plain_throughput']:.2f} "
              f"(original 8-row tiles: {g['original_tile8_over_plain_throughput']:.2f}; "
              f"new / original: {g['new_over_original_throughput']:.2f})")
    return 0
