"""`xds bench reference`: prefill and decode throughput of the monolithic reference engine.

These are the numbers the pod is compared with. Ratios measured in the same run:
- decode batching gain (tokens/s at batch B over batch 1);
- the cost of the batch-invariant GEMM rule (fixed 8-row, single-thread BLAS calls) against a
  plain multi-threaded ``x @ w`` on the model's largest FFN shape.
"""

from __future__ import annotations

import argparse
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


def _gemm_cost_ratio(engine: ReferenceEngine, m: int = 256, reps: int = 20) -> dict:
    from threadpoolctl import threadpool_limits

    cfg = engine.cfg
    w = engine.weights.layers[0].dense.gate if engine.weights.layers[0].dense is not None \
        else engine.weights.layers[0].attn.wq
    x = np.random.default_rng(0).standard_normal((m, w.shape[0])).astype(np.float32)

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_tiled = timed(lambda: L.linear(x, w))
    with threadpool_limits(os.cpu_count() or 1, user_api="blas"):
        t_plain = timed(lambda: x @ w)
    flops = 2.0 * m * w.shape[0] * w.shape[1]
    return {"shape": [m, int(w.shape[0]), int(w.shape[1])], "hidden": cfg.hidden_size,
            "tiled_gflops": flops / t_tiled / 1e9, "plain_multithread_gflops": flops / t_plain / 1e9,
            "tiled_over_plain_throughput": t_plain / t_tiled}


def measure(preset: str, batch_sizes: list[int], prompt_len: int, steps: int, repeats: int) -> dict:
    engine = ReferenceEngine.from_preset(preset, seed=0, max_batch=max(batch_sizes))
    if prompt_len + steps + 1 > engine.cfg.max_position_embeddings:
        raise SystemExit(f"prompt-len + decode-steps exceeds the model's {engine.cfg.max_position_embeddings} positions")
    engine.prefill(_sequences(engine, 1, 8, 1))  # warm up allocations and code paths
    prefill, decode = {}, {}
    for b in batch_sizes:
        pre_t, dec_t = [], []
        for _ in range(repeats):
            seqs = _sequences(engine, b, prompt_len, steps)
            t0 = time.perf_counter()
            engine.prefill(seqs)
            pre_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.decode_step(seqs)
            dec_t.append(time.perf_counter() - t0)
        pm, dm = statistics.median(pre_t), statistics.median(dec_t)
        prefill[str(b)] = {"tokens_per_s": b * prompt_len / pm, "median_s": pm}
        decode[str(b)] = {"tokens_per_s": b * steps / dm, "step_ms": 1000 * dm / steps}
    lo, hi = str(min(batch_sizes)), str(max(batch_sizes))
    return {
        "bench": "reference", "preset": preset, "prompt_len": prompt_len, "decode_steps": steps,
        "repeats": repeats, "cpus": os.cpu_count(), "prefill": prefill, "decode": decode,
        "ratios": {
            f"decode_tps_b{hi}_over_b{lo}": decode[hi]["tokens_per_s"] / decode[lo]["tokens_per_s"],
            f"prefill_tps_b{hi}_over_b{lo}": prefill[hi]["tokens_per_s"] / prefill[lo]["tokens_per_s"],
        },
        "invariant_gemm": _gemm_cost_ratio(engine),
    }


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    result = measure(args.preset, sizes, args.prompt_len, args.decode_steps, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for b in sizes:
            print(f"batch {b:>3}: prefill {result['prefill'][str(b)]['tokens_per_s']:9.1f} tok/s   "
                  f"decode {result['decode'][str(b)]['tokens_per_s']:8.1f} tok/s", file=sys.stdout)
    return 0
