"""The whole pod, real processes: every stream equals the reference engine token for token.

One pod (module scope: fabric, 2 routers, prefill, KV pool, 2 DP groups each with a decode
master and an attention rank, 4 expert instances) is started by the launcher, the SDK talks
to it over gRPC, and counters come from the services' own heartbeats.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from services.client.errors import InvalidArgument, NotFound
from services.client.sdk import InferenceClient
from services.common.health import probe
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.pod.spec import address, services
from tests.loads import Loads
from tests.pods import TestPod

pytestmark = pytest.mark.integration

PROMPTS = [
    "Hello, SuperPod", "The quick brown fox jumps over the lazy dog", "a", "MoE routes tokens to experts",
    "disaggregated prefill and decode", "0123456789" * 4, "Ünïcödé ✓ text", "xDeepServe",
    "attention and experts live on different ranks", "zz", "The KV cache moves over the unified bus",
    "tokens must match the reference", "batch invariance", "?", "CloudMatrix384", "a longer prompt " * 6,
]


def sampling_for(i: int) -> dict:
    """Greedy for even requests, seeded top-p/top-k sampling for odd ones; lengths vary."""
    base = {"max_tokens": 6 + (i * 5) % 23}
    if i % 2:
        base |= {"temperature": 0.7 + 0.1 * (i % 4), "top_p": 0.9, "top_k": 40 * (i % 3), "seed": 1000 + i}
    return base


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("e2e", {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0}}) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def expected(reference: ReferenceEngine, request_id: str, prompt: str, kw: dict) -> tuple[int, ...]:
    params = SamplingParams(**kw)
    return reference.generate([GenerationRequest(request_id, tuple(encode(prompt)), params)])[0].token_ids


def test_every_service_answers_the_standard_grpc_health_check(pod) -> None:
    for s in services(pod.spec):
        if s.role == "fabric":
            target = pod.fabric_admin   # locally on a free port, announced when ready
        else:
            target = address(pod.spec, s.name, "health")
        assert probe(target) == "SERVING", s.name
    # The router's own serving port has the health service too (what load balancers ask).
    for router in pod.routers:
        assert probe(router) == "SERVING"


async def test_16_concurrent_requests_equal_the_reference(pod, reference) -> None:
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        ids = [f"e2e-{i}" for i in range(16)]
        results = await asyncio.gather(*(client.complete(p, request_id=ids[i], **sampling_for(i))
                                         for i, p in enumerate(PROMPTS)))
        for i, (rid, res) in enumerate(zip(ids, results)):
            want = expected(reference, rid, PROMPTS[i], sampling_for(i))
            assert res.token_ids == want, f"request {i} ({sampling_for(i)}) differs from the reference"
            assert res.finish_reason in ("stop", "length")
        # Both DP groups and every expert instance took part.
        for g in range(pod.spec.decode.groups):
            assert (await loads.fresh(f"attention-{g}-0"))["steps"] > 0, f"DP group {g} ran no decode step"
        for e in range(pod.spec.experts.instances):
            assert (await loads.fresh(f"expert-{e}"))["rows_served"] > 0, f"expert-{e} served nothing"


async def test_repeated_prefix_hits_the_kv_pool(pod, reference) -> None:
    prefix = "A shared system prompt that is long enough to fill several KV blocks. " * 2
    async with InferenceClient(pod.routers) as client, Loads(pod) as loads:
        first = await client.complete(prefix + "first question", max_tokens=4, request_id="pfx-1")
        before = await loads.fresh("prefill-0")
        second = await client.complete(prefix + "second question", max_tokens=4, request_id="pfx-2")
        after = await loads.fresh("prefill-0")
    assert first.token_ids == expected(reference, "pfx-1", prefix + "first question", {"max_tokens": 4})
    assert second.token_ids == expected(reference, "pfx-2", prefix + "second question", {"max_tokens": 4})
    n2 = len(encode(prefix + "second question"))
    cached = after["cached_tokens"] - before["cached_tokens"]
    computed = after["computed_tokens"] - before["computed_tokens"]
    assert cached >= pod.spec.kv_pool.block_size * 2 and computed == n2 - cached


async def test_cancel_mid_stream_returns_kv_to_baseline(pod) -> None:
    async with InferenceClient(pod.routers) as client, Loads(pod) as loads:
        base = {g: (await loads.fresh(f"decode-{g}"))["free_kv_blocks"] for g in range(pod.spec.decode.groups)}
        pool_base = (await loads.fresh("kvpool-0"))["pinned_blocks"]
        stream = client.generate("cancel me please " * 4, max_tokens=200, request_id="cancel-1")
        got = []
        async for d in stream:
            got += d.token_ids
            if len(got) >= 3:
                break                      # leaving the stream cancels the request at the router
        await stream.aclose()
        async def settled():
            while True:
                now = {g: (await loads.fresh(f"decode-{g}"))["free_kv_blocks"] for g in base}
                if now == base and (await loads.fresh("kvpool-0"))["pinned_blocks"] == pool_base:
                    return
        await asyncio.wait_for(settled(), 10)


async def test_bad_input_is_rejected_and_the_pod_keeps_serving(pod, reference) -> None:
    async with InferenceClient(pod.routers) as client:
        ok = asyncio.create_task(client.complete("still serving", max_tokens=12, request_id="alive-1"))
        with pytest.raises(InvalidArgument, match="empty"):
            await client.complete("", max_tokens=4)
        with pytest.raises(InvalidArgument, match="limit"):
            await client.complete("x" * 600, max_tokens=4)
        with pytest.raises(InvalidArgument, match="top_p"):
            await client.complete("hi", max_tokens=4, top_p=1.5)
        with pytest.raises(InvalidArgument, match="temperature"):
            await client.complete("hi", max_tokens=4, temperature=-1.0)
        with pytest.raises(NotFound):
            await client.cancel("no-such-request")
        res = await ok
    assert res.token_ids == expected(reference, "alive-1", "still serving", {"max_tokens": 12})


def test_bench_serve_prints_json_and_matches_the_reference(pod) -> None:
    import json
    import sys
    eps = [a for r in pod.routers for a in ("--endpoint", r)]
    r = subprocess.run([sys.executable, "-m", "services.cli", "bench", "serve", *eps, "--num-prompts", "6",
                        "--concurrency", "3", "--max-tokens", "8", "--compare-reference", "--model", pod.model_dir,
                        "--pod", str(pod.spec_file), "--json"],
                       capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["pod"]["completed"] == 6 and res["pod"]["errors"] == 0
    assert res["reference"]["streams_differing_from_pod"] == 0
    assert res["pod"]["ttft_ms"]["p50"] > 0 and res["ratios"]["pod_over_reference_tokens_per_s"] > 0
    prof = res["step_profile"]
    assert prof["master_steps"] > 0 and prof["attention_ms_per_step"]["local_compute"] > 0
    assert prof["expert_compute_ms_per_attention_step"] > 0
