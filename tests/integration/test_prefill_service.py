"""Prefill service with real processes: fabric simulator, kvpool-0, prefill-0.

The first token must equal the reference engine's; the KV the prefill stored in the pool must
be the reference KV bit for bit (read back over XCCL by a test endpoint); a prompt sharing a
long prefix must be served partly from the pool's cache; bad input gets INVALID_ARGUMENT and
the service keeps serving.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from services.common.rpc import RemoteError, RpcClient
from services.kvpool.client import KVPoolClient
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.pod.spec import address
from services.prefill.messages import PrefillStats, PrefillStatsQuery
from services.protocol.inference import Prefill, PrefillDone, Sampling, Subscribe
from tests.pods import TestPod, test_endpoint

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


SHARED = "You are a helpful assistant serving a long shared system prompt; answer briefly. "


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    procs = TestPod.create("pf", {"prefill": 1, "kv_pool": {"nodes": 1, "capacity_blocks": 256, "block_size": 16}})
    try:
        procs.start(only=["kvpool-0", "prefill-0"])
        yield procs
    finally:
        codes = procs.stop()
    assert codes["prefill-0"] == 0 and codes["kvpool-0"] == 0, codes


@pytest.fixture(scope="module")
def engine(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def first_token(engine: ReferenceEngine, rid: str, ids: tuple[int, ...], p: SamplingParams) -> int:
    one = SamplingParams(p.temperature, p.top_p, p.top_k, p.seed, 1, p.stop_token_ids)
    return engine.generate([GenerationRequest(rid, ids, one)])[0].token_ids[0]


async def test_first_tokens_equal_the_reference_and_kv_is_stored_exactly(pod, engine) -> None:
    client = RpcClient(address(pod.spec, "prefill-0", "rpc"))
    try:
        params = [SamplingParams(max_tokens=8), SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=8),
                  SamplingParams(temperature=1.2, top_k=10, max_tokens=8)]
        texts = ["Hello, world", "The quick brown fox jumps", "MoE", "x" * 40, "Ünïcödé ✓"]
        reqs = [(f"ref-{i}", tuple(encode(t)), params[i % 3]) for i, t in enumerate(texts)]
        # Concurrent: they may share a forward pass; the tokens must not depend on it.
        dones = await asyncio.gather(*[client.call(Prefill(rid, ids, Sampling.of(p), len(ids)), timeout_s=30)
                                       for rid, ids, p in reqs])
        for (rid, ids, p), done in zip(reqs, dones):
            assert isinstance(done, PrefillDone) and done.request_id == rid
            assert done.next_token == first_token(engine, rid, ids, p), rid
            assert done.kv.num_tokens == len(ids) and done.cached_tokens + done.computed_tokens == len(ids)
        # Read one hand-off back from the pool as an attention rank would, and compare bits.
        rid, ids, p = reqs[3]
        done = dones[3]
        async with test_endpoint(pod.spec, "attention-0-0") as ep:
            pool = KVPoolClient(pod.spec, ep, engine.cfg)
            try:
                kv = await pool.load(done.kv, rid, timeout_s=10)
            finally:
                await pool.close()
        s = SequenceState(GenerationRequest(rid, ids, p), new_kv(engine.cfg, len(ids)))
        forward(engine.cfg, engine.weights, engine.rope, [(s, ids)])
        for (k, v), (rk, rv) in zip(kv, s.kv):
            assert np.array_equal(k, rk) and np.array_equal(v, rv)
    finally:
        await client.close()


async def test_shared_prefix_is_served_from_the_pool(pod, engine) -> None:
    client = RpcClient(address(pod.spec, "prefill-0", "rpc"))
    try:
        before = await client.call(PrefillStatsQuery(), timeout_s=5)
        a = tuple(encode(SHARED + "What is a KV cache?"))
        b = tuple(encode(SHARED + "And what is an expert?"))
        p = SamplingParams(max_tokens=4)
        da = await client.call(Prefill("pre-a", a, Sampling.of(p), len(a)), timeout_s=30)
        db = await client.call(Prefill("pre-b", b, Sampling.of(p), len(b)), timeout_s=30)
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert da.cached_tokens == 0 and da.computed_tokens == len(a)
        assert db.cached_tokens == (common // 16) * 16 > 0
        assert db.computed_tokens == len(b) - db.cached_tokens < len(b)
        assert db.next_token == first_token(engine, "pre-b", b, p)
        # The same prompt again: everything but the last token comes from the pool.
        again = await client.call(Prefill("pre-a2", a, Sampling.of(p), len(a)), timeout_s=30)
        assert again.cached_tokens == ((len(a) - 1) // 16) * 16 and again.next_token == da.next_token
        after = await client.call(PrefillStatsQuery(), timeout_s=5)
        assert isinstance(after, PrefillStats)
        assert after.requests - before.requests == 3
        assert after.cached_tokens - before.cached_tokens == db.cached_tokens + again.cached_tokens
        assert after.computed_tokens - before.computed_tokens == len(a) + db.computed_tokens + again.computed_tokens
    finally:
        await client.close()


async def test_invalid_input_is_refused_and_the_service_keeps_serving(pod, engine) -> None:
    client = RpcClient(address(pod.spec, "prefill-0", "rpc"))
    try:
        good = Sampling.of(SamplingParams(max_tokens=4))
        bad_msgs = [Prefill("bad-1", (), good), Prefill("bad-2", (256, 9999), good),
                    Prefill("bad-3", (256, 65), Sampling(-1.0, 1.0, 0, None, 4, ())),
                    Prefill("bad-4", (256, 65), good, position_offset=7), Subscribe("x")]
        for m in bad_msgs:
            with pytest.raises(RemoteError) as e:
                await client.call(m, timeout_s=5)
            assert e.value.code == "INVALID_ARGUMENT", m
        assert "9999" in str((await _refusal(client, bad_msgs[1])).message)
        ids = tuple(encode("still serving"))
        done = await client.call(Prefill("after-bad", ids, good, len(ids)), timeout_s=30)
        assert done.next_token == first_token(engine, "after-bad", ids, SamplingParams(max_tokens=4))
        stats = await client.call(PrefillStatsQuery(), timeout_s=5)
        assert stats.invalid >= 5
        assert pod.alive("prefill-0")
    finally:
        await client.close()


async def _refusal(client: RpcClient, msg) -> RemoteError:
    try:
        await client.call(msg, timeout_s=5)
    except RemoteError as exc:
        return exc
    raise AssertionError(f"{msg} was accepted")
