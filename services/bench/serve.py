"""`xds bench serve`: load a running pod (or any OpenAI-compatible server) and measure it, as
``vllm bench serve`` does.

Prompts are deterministic (seeded; prompt i is the same in every run). Requests arrive at
``--request-rate`` (Poisson, or gamma with ``--burstiness``; ``inf`` = all at once), at most
``--max-concurrency`` in flight, for ``--num-prompts`` requests or ``--duration`` seconds.
Several rates (``--request-rate 1,2,4,inf``) run one after another; the JSON has one entry
per rate in ``runs``. Reported per rate: request and token throughput, TTFT, TPOT, ITL and
E2EL (mean, median, std and ``--percentiles``), ``--goodput`` against SLOs, errors.

With ``--compare-reference`` the reference engine serves the same requests (same sampling,
continuous batching at the same concurrency) in this process, in the same invocation: the
JSON gets the pod/reference throughput ratio and how many streams differ from the oracle
(must be zero). ``--pod`` adds the decode-step profile read from the services' heartbeats.
``--plot DIR`` draws PNGs (services/bench/serve_plot.py); ``--save-result`` writes the JSON.
Pure parts (arrivals, metrics, goodput) live in services/bench/serve_core.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.bench import serve_core as core
from services.bench.cpu import cpu_report, cpu_seconds

HELP = "load a running pod or an OpenAI server: throughput, TTFT, TPOT, ITL, goodput, plots; --compare-reference"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("xds-grpc", "openai"), default="xds-grpc",
                   help="xds-grpc: the pod's SDK (--endpoint); openai: streaming /v1/completions (--base-url)")
    p.add_argument("--endpoint", action="append", default=None, metavar="HOST:PORT", help="a router (gRPC)")
    p.add_argument("--base-url", default=None, metavar="URL", help="an OpenAI-compatible server (openai backend)")
    p.add_argument("--ready-file", default=None, help="xds up's ready file: routers (gRPC) or http[0] (openai)")
    p.add_argument("--served-model-name", default=None, help="openai backend: the model field (default: the "
                   "first of GET /v1/models)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="issue requests until S seconds have passed (instead of --num-prompts)")
    p.add_argument("--max-concurrency", "--concurrency", dest="max_concurrency", type=int, default=None,
                   help="requests in flight at most (default: unbounded)")
    p.add_argument("--request-rate", default="inf", help="requests/s, comma-separated for a sweep (inf = all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1 = Poisson)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in bytes (tokens = bytes + BOS)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds prompts, arrivals and sampling")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput: ttft:MS tpot:MS e2el:MS (a request must meet all given)")
    p.add_argument("--percentiles", default="50,90,99", help="percentiles of every latency metric")
    p.add_argument("--save-result", default=None, metavar="FILE.json", help="also write the JSON here")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (off anyway when stderr is no TTY)")
    p.add_argument("--compare-reference", action="store_true")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="reference model preset (must be the pod's model)")
    src.add_argument("--model", default=None, help="reference model directory (must be the pod's model)")
    p.add_argument("--pod", default=None, help="the pod's spec (xds up writes RUN_DIR/pod.yaml): adds the "
                   "decode-step profile read from the services' heartbeats")
    p.add_argument("--json", action="store_true")


def prompt_texts(length: int, seed: int) -> Iterator[str]:
    """Prompt i is the same whatever the number asked for."""
    rng = random.Random(seed)
    words = ["expert", "token", "attention", "decode", "prefill", "fabric", "pod", "cache", "route", "batch"]
    i = 0
    while True:
        text = f"[{i}] " + " ".join(rng.choice(words) for _ in range(length))
        yield text[:length] if length > 8 else text
        i += 1


def make_prompts(n: int, length: int, seed: int) -> list[str]:
    it = prompt_texts(length, seed)
    return [next(it) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    return core.percentile(xs, q)


class Prompts:
    """Prompts and their token ids, grown on demand and shared by every run."""

    def __init__(self, length: int, seed: int) -> None:
        self._it = prompt_texts(length, seed)
        self.texts: list[str] = []
        self.ids: list[tuple[int, ...]] = []

    def get(self, i: int) -> tuple[str, tuple[int, ...]]:
        from services.model.engine import prompt_ids

        while len(self.texts) <= i:
            self.texts.append(next(self._it))
            self.ids.append(prompt_ids(self.texts[-1]))
        return self.texts[i], self.ids[i]


def make_backend(args: argparse.Namespace) -> Any:
    from services.bench.serve_backends import GrpcBackend, OpenAIBackend

    if args.backend == "openai":
        return OpenAIBackend(args.base_url, args.served_model_name, args.timeout_s)
    return GrpcBackend(args.endpoint, args.timeout_s)


def _progress(args: argparse.Namespace, total: int | None, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"rate {label}", unit="req", file=sys.stderr, leave=True,
                disable=args.no_progress or not sys.stderr.isatty())


async def run_rate(args: argparse.Namespace, backend: Any, prompts: Prompts, rate: float,
                   seed: int) -> tuple[list[core.Record], float, float]:
    """One run at ``rate``: its records, start time and duration (first send to last answer)."""
    closed_loop = math.isinf(rate) and args.duration is not None   # inf + duration: a slot frees, a request goes
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    # Fresh ids per run: an id is an idempotency key, and the router keeps finished requests
    # for a while, so reusing ids would re-read old results instead of measuring.
    run_id = uuid.uuid4().hex[:8]
    records: list[core.Record] = []
    bar = _progress(args, None if args.duration is not None else args.num_prompts, core.rate_label(rate))
    seeded = bool(args.temperature)

    async def one(r: core.Record, text: str, ids: tuple[int, ...]) -> None:
        try:
            if sem is not None and not closed_loop:
                async with sem:
                    await backend.send(r, text, ids, args.max_tokens, args.temperature,
                                       args.seed + r.index if seeded else None)
            else:
                await backend.send(r, text, ids, args.max_tokens, args.temperature,
                                   args.seed + r.index if seeded else None)
        finally:
            if closed_loop:
                sem.release()
            bar.update(1)

    tasks: list[asyncio.Task] = []
    gaps = core.arrival_gaps(rate, args.burstiness, random.Random(seed))
    t0 = time.perf_counter()
    due = 0.0
    try:
        while args.duration is not None or len(records) < args.num_prompts:
            if closed_loop:
                await sem.acquire()
            if args.duration is not None and time.perf_counter() - t0 >= args.duration:
                if closed_loop:
                    sem.release()
                break
            i = len(records)
            text, ids = prompts.get(i)
            r = core.Record(i, f"bench-{run_id}-{i}", prompt_tokens=len(ids))
            records.append(r)
            tasks.append(asyncio.create_task(one(r, text, ids)))
            due += next(gaps)
            delay = t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)   # the arrival schedule itself, not a synchronisation
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
    end = max((r.end for r in records), default=t0)
    return records, t0, max(end - t0, 1e-9)


async def run_all(args: argparse.Namespace, rates: list[float], prompts: Prompts) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    async with make_backend(args) as backend:
        try:
            await backend.probe()
        except Exception as exc:   # unreachable, wrong URL, not an OpenAI server: say so, no traceback
            raise core.BenchArgError(f"cannot use the {args.backend} backend: {type(exc).__name__}: {exc}") from exc
        if args.compare_reference and not backend.returns_token_ids:
            raise core.BenchArgError("--compare-reference: this server does not return token ids "
                                     "(vLLM's return_token_ids), so its tokens cannot be compared")
        probe = None
        if args.pod:
            from services.bench.profile import ProfileProbe
            from services.pod.spec import load_pod

            probe = ProfileProbe(load_pod(args.pod))
            await probe.__aenter__()
        pids = getattr(args, "pids", None) or {}
        try:
            for k, rate in enumerate(rates):
                before = await probe.snapshot() if probe else None
                cpu0 = cpu_seconds(pids)
                records, t0, duration = await run_rate(args, backend, prompts, rate, args.seed + 1 + k)
                run: dict[str, Any] = {"rate": rate, "records": records, "t0": t0, "duration": duration}
                if pids:   # a local pod (its ready file names the processes)
                    run["cpu"] = cpu_report(cpu0, cpu_seconds(pids), duration,
                                            sum(sum(r.chunk_tokens) for r in records))
                if probe:
                    from services.bench.profile import step_profile

                    run["step_profile"] = step_profile(before, await probe.snapshot())
                runs.append(run)
        finally:
            if probe:
                await probe.__aexit__(None, None, None)
    return runs


def run_reference(args: argparse.Namespace, prompts: Prompts, n: int) -> tuple[dict, list[tuple[int, ...]]]:
    """The reference engine on prompts 0..n-1 (the pod's requests, same sampling)."""
    from services.model.engine import GenerationRequest, ReferenceEngine
    from services.model.sampling import SamplingParams

    batch = args.max_concurrency or max(n, 1)
    engine = (ReferenceEngine.from_dir(args.model, max_batch=batch) if args.model
              else ReferenceEngine.from_preset(args.preset, max_batch=batch))
    reqs = [GenerationRequest(f"ref-{i}", prompts.get(i)[1], SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens,
        seed=args.seed + i if args.temperature else None)) for i in range(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    results = engine.generate(reqs)
    duration, cpu = time.perf_counter() - t0, time.process_time() - c0
    out_tokens = sum(len(res.token_ids) for res in results)
    return ({"requests": n, "max_batch": batch, "duration_s": duration, "output_tokens": out_tokens,
             "output_tokens_per_s": out_tokens / duration,
             "cpu_ms_per_output_token": 1e3 * cpu / out_tokens if out_tokens else None},
            [res.token_ids for res in results])


async def run_pod(args: argparse.Namespace, prompts: list[str]) -> tuple[list[core.Record], float]:
    """``prompts`` all at once over gRPC, ``args.concurrency`` in flight (for `xds bench straggler`)."""
    from services.bench.serve_backends import GrpcBackend
    from services.model.engine import prompt_ids

    sem = asyncio.Semaphore(args.concurrency)
    run_id = uuid.uuid4().hex[:8]
    records = [core.Record(i, f"bench-{run_id}-{i}", prompt_tokens=len(prompt_ids(p))) for i, p in enumerate(prompts)]

    async def one(backend: GrpcBackend, r: core.Record) -> None:
        async with sem:
            await backend.send(r, prompts[r.index], (), args.max_tokens, args.temperature,
                               args.seed + r.index if args.temperature else None)

    async with GrpcBackend(args.endpoint, args.timeout_s) as backend:
        await backend.probe()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(backend, r) for r in records))
        return records, time.perf_counter() - t0


def summarize(records: list[core.Record], duration: float) -> dict:
    return core.summarize(records, duration, (50, 99))


def _clean(x: Any) -> Any:
    """Strict JSON: nan -> null, inf -> "inf"."""
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _resolve(args: argparse.Namespace) -> str | None:
    """Addresses from the ready file; an error message when something is missing."""
    if args.ready_file:
        info = json.loads(Path(args.ready_file).read_text())
        args.endpoint = args.endpoint or info["routers"]
        args.pids = info.get("pids") or {}
        args.base_url = args.base_url or (info.get("http") or [None])[0]
    if args.compare_reference and not (args.preset or args.model):
        return "--compare-reference needs the pod's model: --preset NAME or --model DIR"
    if args.backend == "xds-grpc" and not args.endpoint:
        return "the xds-grpc backend needs --endpoint HOST:PORT (or --ready-file)"
    if args.backend == "openai" and not args.base_url:
        return "the openai backend needs --base-url URL (or --ready-file)"
    if args.duration is not None and not args.duration > 0:
        return "--duration must be > 0 seconds"
    if args.max_concurrency is not None and args.max_concurrency < 1:
        return "--max-concurrency must be >= 1"
    return None


def run(args: argparse.Namespace) -> int:
    try:
        problem = _resolve(args)
        if problem:
            raise core.BenchArgError(problem)
        rates = core.parse_rates(args.request_rate)
        percentiles = core.parse_percentiles(args.percentiles)
        slos = core.parse_goodput(args.goodput or [])
        if any(math.isinf(r) for r in rates) and args.duration is not None and not args.max_concurrency:
            raise core.BenchArgError("rate inf with --duration needs --max-concurrency (else it never stops sending)")
        next(core.arrival_gaps(1.0, args.burstiness, random.Random(0)))   # validates --burstiness
        prompts = Prompts(args.prompt_len, args.seed)
        runs = asyncio.run(run_all(args, rates, prompts))
    except core.BenchArgError as exc:
        print(f"xds bench serve: {exc}", file=sys.stderr)
        return 2
    summaries = [core.summarize(r["records"], r["duration"], percentiles, slos) for r in runs]
    result: dict[str, Any] = {
        "bench": "serve", "backend": args.backend,
        "target": args.base_url if args.backend == "openai" else args.endpoint,
        "num_prompts": args.num_prompts if args.duration is None else None, "duration": args.duration,
        "max_concurrency": args.max_concurrency, "concurrency": args.max_concurrency,
        "request_rate": rates[0] if len(rates) == 1 else rates, "burstiness": args.burstiness,
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "percentiles": percentiles,
        "runs": [{"request_rate": r["rate"], "pod": s,
                  **{k: r[k] for k in ("step_profile", "cpu") if k in r}}
                 for r, s in zip(runs, summaries)],
    }
    differing = 0
    if args.compare_reference:
        ref, expected = run_reference(args, prompts, max(len(r["records"]) for r in runs))
        for entry, r in zip(result["runs"], runs):
            bad = core.mismatches(r["records"], expected)
            differing += len(bad)
            entry["streams_differing_from_reference"] = len(bad)
            entry["differing_ids"] = bad[:5]
            entry["pod_over_reference_tokens_per_s"] = entry["pod"]["output_tokens_per_s"] / ref["output_tokens_per_s"]
            if "cpu" in entry and entry["cpu"]["cpu_ms_per_output_token"] and ref["cpu_ms_per_output_token"]:
                entry["pod_over_reference_cpu_per_token"] = (entry["cpu"]["cpu_ms_per_output_token"]
                                                             / ref["cpu_ms_per_output_token"])
        result["reference"] = {**ref, "streams_differing_from_pod": differing}
    if len(runs) == 1:   # the single-rate shape of earlier versions, kept for scripts
        result["pod"] = result["runs"][0]["pod"]
        for key in ("step_profile", "cpu"):
            if key in result["runs"][0]:
                result[key] = result["runs"][0][key]
        if args.compare_reference:
            result["ratios"] = {k: result["runs"][0][k] for k in ("pod_over_reference_tokens_per_s",
                                                                 "pod_over_reference_cpu_per_token")
                                if k in result["runs"][0]}
    if args.plot:
        from services.bench.serve_plot import plot_all

        title = (f"xds bench serve, {args.backend}, {args.max_tokens} output tokens, prompt {args.prompt_len} B, "
                 f"max concurrency {args.max_concurrency or 'unbounded'}")
        result["plots"] = plot_all(args.plot, [
            {"label": core.rate_label(r["rate"]), "summary": s,
             "ttft_ms": [x.ttft_ms for x in r["records"] if x.ok],
             "tpot_ms": [x.tpot_ms for x in r["records"] if x.ok and x.output_tokens > 1],
             "timeline": core.timeline(r["records"], r["t0"])} for r, s in zip(runs, summaries)], title)
    text = json.dumps(_clean(result), indent=2)
    if args.save_result:
        Path(args.save_result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_result).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for entry in result["runs"]:
            pod = entry["pod"]
            line = (f"rate {core.rate_label(entry['request_rate'])}: {pod['completed']} ok, {pod['errors']} errors, "
                    f"{pod['output_tokens_per_s']:.1f} tok/s, TTFT p50 {pod['ttft_ms']['median']:.1f} ms, "
                    f"TPOT p50 {pod['tpot_ms']['median']:.1f} ms")
            if "goodput" in pod:
                line += f", goodput {pod['goodput']['request_goodput']:.2f} req/s"
            if "streams_differing_from_reference" in entry:
                line += f", {entry['streams_differing_from_reference']} streams differ from the reference"
            print(line)
    failed = any(s["errors"] for s in summaries) or differing
    if failed:
        print("bench serve: errors or streams differing from the reference (see JSON)", file=sys.stderr)
    return 1 if failed else 0
