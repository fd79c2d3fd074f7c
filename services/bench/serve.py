"""`xds bench serve`: load a running pod through the SDK and measure it (vllm-bench-serve style).

Prompts are deterministic (seeded), requests run with bounded concurrency and an optional
Poisson arrival rate. Reports output tokens/s, TTFT, TPOT and ITL (p50/p99), errors. With
``--compare-reference`` the reference engine serves the same requests (same ids, same
sampling, continuous batching at the same concurrency) in this process, in the same run: the
JSON gets the pod/reference throughput ratio and how many streams differ from the oracle
(which must be zero).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field

HELP = "load a running pod through the SDK: throughput, TTFT, TPOT, ITL; --compare-reference"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", action="append", required=True, metavar="HOST:PORT")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0 = all at once)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in bytes (tokens = bytes + BOS)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds prompts, arrivals and sampling")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--compare-reference", action="store_true")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="reference model preset (must be the pod's model)")
    src.add_argument("--model", default=None, help="reference model directory (must be the pod's model)")
    p.add_argument("--pod", default=None, help="the pod's spec (xds up writes RUN_DIR/pod.yaml): adds the "
                   "decode-step profile read from the services' heartbeats")
    p.add_argument("--json", action="store_true")


@dataclass
class Record:
    request_id: str
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    error: str = ""


def make_prompts(n: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["expert", "token", "attention", "decode", "prefill", "fabric", "pod", "cache", "route", "batch"]
    out = []
    for i in range(n):
        text = f"[{i}] " + " ".join(rng.choice(words) for _ in range(length))
        out.append(text[:length] if length > 8 else text)
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run_pod(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Record], float]:
    from services.client.sdk import InferenceClient

    sem = asyncio.Semaphore(args.concurrency)
    rng = random.Random(args.seed + 1)
    # Fresh ids per run: an id is an idempotency key, and the router keeps finished requests
    # for a while, so reusing ids would re-read old results instead of measuring.
    run_id = uuid.uuid4().hex[:8]
    records = [Record(f"bench-{run_id}-{i}") for i in range(len(prompts))]

    async def one(i: int, client: InferenceClient) -> None:
        r = records[i]
        async with sem:
            r.start = time.perf_counter()
            try:
                async for d in client.generate(prompts[i], max_tokens=args.max_tokens, temperature=args.temperature,
                                               seed=args.seed + i if args.temperature else None,
                                               request_id=r.request_id):
                    if d.token_ids:
                        r.token_times.append(time.perf_counter())
                        r.token_ids += d.token_ids
            except Exception as exc:  # counted and reported, never silently dropped
                r.error = f"{type(exc).__name__}: {exc}"

    async with InferenceClient(args.endpoint, timeout_s=args.timeout_s) as client:
        await client.model_info()  # connect before the clock starts
        t0 = time.perf_counter()
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(one(i, client)))
            if args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        return records, time.perf_counter() - t0


async def run_pod_profiled(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Record], float, dict | None]:
    if not args.pod:
        records, duration = await run_pod(args, prompts)
        return records, duration, None
    from services.bench.profile import ProfileProbe, step_profile
    from services.pod.spec import load_pod

    async with ProfileProbe(load_pod(args.pod)) as probe:
        before = await probe.snapshot()
        records, duration = await run_pod(args, prompts)
        after = await probe.snapshot()
    return records, duration, step_profile(before, after)


def summarize(records: list[Record], duration: float) -> dict:
    ok = [r for r in records if not r.error and r.token_times]
    ttft = [(r.token_times[0] - r.start) * 1e3 for r in ok]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    tpot = [(r.token_times[-1] - r.token_times[0]) * 1e3 / (len(r.token_ids) - 1) for r in ok if len(r.token_ids) > 1]
    out_tokens = sum(len(r.token_ids) for r in ok)
    return {
        "completed": len(ok), "errors": len(records) - len(ok),
        "error_samples": [r.error for r in records if r.error][:3],
        "duration_s": duration, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration,
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
    }


def run_reference(args: argparse.Namespace, prompts: list[str], records: list[Record]) -> dict:
    from services.model.engine import GenerationRequest, ReferenceEngine, prompt_ids
    from services.model.sampling import SamplingParams

    engine = (ReferenceEngine.from_dir(args.model, max_batch=args.concurrency) if args.model
              else ReferenceEngine.from_preset(args.preset, max_batch=args.concurrency))
    reqs = [GenerationRequest(r.request_id, prompt_ids(p), SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens,
        seed=args.seed + i if args.temperature else None)) for i, (r, p) in enumerate(zip(records, prompts))]
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    duration = time.perf_counter() - t0
    mismatches = [r.request_id for r, res in zip(records, results) if not r.error and tuple(r.token_ids) != res.token_ids]
    out_tokens = sum(len(res.token_ids) for res in results)
    return {"duration_s": duration, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration,
            "streams_differing_from_pod": len(mismatches), "differing_ids": mismatches[:5]}


def run(args: argparse.Namespace) -> int:
    if args.compare_reference and not (args.preset or args.model):
        print("bench serve: --compare-reference needs the pod's model: --preset NAME or --model DIR", file=sys.stderr)
        return 2
    prompts = make_prompts(args.num_prompts, args.prompt_len, args.seed)
    records, duration, profile = asyncio.run(run_pod_profiled(args, prompts))
    result = {"bench": "serve", "num_prompts": args.num_prompts, "concurrency": args.concurrency,
              "request_rate": args.request_rate, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "pod": summarize(records, duration)}
    if profile is not None:
        result["step_profile"] = profile
    if args.compare_reference:
        ref = run_reference(args, prompts, records)
        result["reference"] = ref
        result["ratios"] = {"pod_over_reference_tokens_per_s":
                            result["pod"]["output_tokens_per_s"] / ref["output_tokens_per_s"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        pod = result["pod"]
        print(f"{pod['completed']} ok, {pod['errors']} errors, {pod['output_tokens_per_s']:.1f} tok/s, "
              f"TTFT p50 {pod['ttft_ms']['p50']:.1f} ms, TPOT p50 {pod['tpot_ms']['p50']:.1f} ms")
    failed = result["pod"]["errors"] or result.get("reference", {}).get("streams_differing_from_pod", 0)
    if failed:
        print("bench serve: errors or streams differing from the reference (see JSON)", file=sys.stderr)
    return 1 if failed else 0
