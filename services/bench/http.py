"""`xds bench http`: what the OpenAI-compatible HTTP front costs per streamed token, against
the gRPC path of the same router, in the same run.

One request at a time (so it measures the per-token path, not batching), alternating gRPC
(the SDK's ``generate``) and HTTP (``POST /v1/completions`` with ``stream: true``, SSE read
with aiohttp's client) with the same greedy prompt, so both see the same pod state. For each
request: TTFT and TPOT ((last token - first token) / (tokens - 1)). The JSON gives the means,
the medians, ``tpot_ratio`` (HTTP / gRPC) and ``added_us_per_token``; ``tokens_equal`` says
that both transports streamed the same tokens (it must be true).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

HELP = "OpenAI HTTP vs gRPC: added latency per streamed token, same router, same run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-file", default=None, help="xds up's ready file (routers[0] and http[0])")
    p.add_argument("--endpoint", default=None, metavar="HOST:PORT", help="a router's gRPC address")
    p.add_argument("--base-url", default=None, metavar="URL", help="the same router's HTTP base URL")
    p.add_argument("--requests", type=int, default=20, help="requests per transport")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="Measure the HTTP front, token by token.")
    p.add_argument("--json", action="store_true")


async def _grpc(client, prompt: str, max_tokens: int) -> tuple[float, list[float], tuple[int, ...]]:
    t0 = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    async for d in client.generate(prompt, max_tokens=max_tokens, temperature=0.0):
        now = time.perf_counter()
        times += [now] * len(d.token_ids)
        ids += d.token_ids
    return t0, times, tuple(ids)


async def _http(session, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], tuple[int, ...]]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True}
    t0 = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter()
            got = json.loads(line[6:])["choices"][0]["token_ids"]
            times += [now] * len(got)
            ids += got
    return t0, times, tuple(ids)


def _stats(runs: list[tuple[float, list[float], tuple[int, ...]]]) -> dict[str, float]:
    ttft = [times[0] - t0 for t0, times, _ in runs]
    tpot = [(times[-1] - times[0]) / (len(times) - 1) for _, times, _ in runs if len(times) > 1]
    return {"requests": len(runs), "tokens": sum(len(ids) for *_, ids in runs),
            "ttft_ms_mean": 1e3 * statistics.fmean(ttft), "ttft_ms_p50": 1e3 * statistics.median(ttft),
            "tpot_ms_mean": 1e3 * statistics.fmean(tpot), "tpot_ms_p50": 1e3 * statistics.median(tpot)}


async def measure(endpoint: str, base_url: str, n: int, max_tokens: int, prompt: str) -> dict:
    import aiohttp

    from services.client import InferenceClient

    async with InferenceClient([endpoint], timeout_s=120) as client, aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        await _grpc(client, prompt, max_tokens)          # warm both paths up
        await _http(session, base_url, model, prompt, max_tokens)
        grpc_runs, http_runs = [], []
        for _ in range(n):
            grpc_runs.append(await _grpc(client, prompt, max_tokens))
            http_runs.append(await _http(session, base_url, model, prompt, max_tokens))
    g, h = _stats(grpc_runs), _stats(http_runs)
    return {"grpc": g, "http": h, "tpot_ratio": h["tpot_ms_mean"] / g["tpot_ms_mean"],
            "ttft_ratio": h["ttft_ms_mean"] / g["ttft_ms_mean"],
            "added_us_per_token": 1e3 * (h["tpot_ms_mean"] - g["tpot_ms_mean"]),
            "tokens_equal": len({ids for *_, ids in grpc_runs + http_runs}) == 1}


def run(args: argparse.Namespace) -> int:
    endpoint, base_url = args.endpoint, args.base_url
    if args.ready_file:
        info = json.loads(Path(args.ready_file).read_text())
        endpoint, base_url = endpoint or info["routers"][0], base_url or info["http"][0]
    if not (endpoint and base_url):
        print("xds bench http: give --ready-file, or --endpoint and --base-url", file=sys.stderr)
        return 2
    out = asyncio.run(measure(endpoint, base_url.rstrip("/"), args.requests, args.max_tokens, args.prompt))
    out = {"endpoint": endpoint, "base_url": base_url, "max_tokens": args.max_tokens, **out}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0 if out["tokens_equal"] else 1
