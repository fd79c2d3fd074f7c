"""The KV hand-off prefill -> attention rank survives the loss of either copy (real processes).

Fabric, kvpool-0 and prefill-0 run; the test process plays attention-0-0 with the rank's own
``KVLoader`` over a real XCCL endpoint. A ``PrefillDone``'s KV is staged at the prefill and
written to the pool; the rank must get it bit for bit (the reference engine's KV) when the
pool died after the store, when the staged copy is gone (reclaimed: digest differs) and the
pool has it, and it acknowledges the stage so the prefill frees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import numpy as np
import pytest

from services.attention.kvload import KVLoader
from services.common.rpc import RpcClient
from services.kvpool.client import KVPoolClient, KVPoolUnavailable
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.pod.spec import address
from services.prefill.messages import PrefillStatsQuery
from services.protocol.inference import Prefill, PrefillDone, Sampling
from tests.loads import Loads
from tests.pods import TestPod, test_endpoint

pytestmark = pytest.mark.integration

TEXT = "The KV of this prompt moves from prefill to decode without the pool in the path. "


@pytest.fixture(scope="module")
def pod():
    p = TestPod.create("kvh", {"kv_pool": {"capacity_blocks": 128, "block_size": 16, "probe_interval_s": 0.1}})
    try:
        p.start(only=["kvpool-0", "prefill-0"])
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def engine(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def reference_kv(engine: ReferenceEngine, rid: str, ids: tuple[int, ...]) -> list:
    s = SequenceState(GenerationRequest(rid, ids, SamplingParams(max_tokens=1)), new_kv(engine.cfg, len(ids)))
    forward(engine.cfg, engine.weights, engine.rope, [(s, ids)])
    return s.kv


def assert_exact(kv, ref_kv, n: int) -> None:
    for (k, v), (rk, rv) in zip(kv, ref_kv):
        assert np.array_equal(k[:, :n], rk[:, :n]) and np.array_equal(v[:, :n], rv[:, :n])


async def prefill(client: RpcClient, rid: str, ids: tuple[int, ...]) -> PrefillDone:
    done = await client.call(Prefill(rid, ids, Sampling.of(SamplingParams(max_tokens=4)), len(ids)), timeout_s=30)
    assert isinstance(done, PrefillDone) and done.kv.source == "prefill-0"
    return done


async def until_prefill(loads: Loads, key: str, want: float, timeout_s: float = 20.0) -> None:
    """Until a heartbeat of prefill-0 published from now on carries ``key == want``."""
    async def wait() -> None:
        while (await loads.fresh("prefill-0"))[key] != want:
            pass
    await asyncio.wait_for(wait(), timeout_s)


async def test_a_staged_copy_is_loaded_exactly_and_released_and_a_reclaimed_one_falls_back_to_the_pool(
        pod, engine) -> None:
    client = RpcClient(address(pod.spec, "prefill-0", "rpc"))
    try:
        async with test_endpoint(pod.spec, "attention-0-0") as ep:
            pool = KVPoolClient(pod.spec, ep, engine.cfg)
            loader = KVLoader(pod.spec, ep, pool)
            try:
                ids = tuple(encode(TEXT + "one"))
                done = await prefill(client, "h-1", ids)
                assert (await client.call(PrefillStatsQuery(), timeout_s=5)).staged >= 1
                kv = await loader(done.kv, "h-1")
                assert_exact(kv, reference_kv(engine, "h-1", ids), len(ids))
                assert loader.stats == {"staged_loads": 1, "pool_loads": 0, "stage_failures": 0}
                async with Loads(pod) as loads:
                    await until_prefill(loads, "staged", 0)   # the one-way StageRelease landed
                # The stage is gone now: a ref whose digest does not match what is there is
                # never decoded; the pool's copy is loaded instead, exact.
                ids2 = tuple(encode(TEXT + "two"))
                done2 = await prefill(client, "h-2", ids2)
                forged = dataclasses.replace(done2.kv, digest=b"\x00" * 16)
                kv2 = await loader(forged, "h-2")
                assert_exact(kv2, reference_kv(engine, "h-2", ids2), len(ids2))
                assert loader.stats["stage_failures"] == 1 and loader.stats["pool_loads"] == 1
            finally:
                await loader.close()
                await pool.close()
    finally:
        await client.close()


async def test_the_pool_dying_between_store_and_load_costs_nothing_then_it_is_bypassed_and_used_again(
        pod, engine) -> None:
    client = RpcClient(address(pod.spec, "prefill-0", "rpc"))
    try:
        async with test_endpoint(pod.spec, "attention-0-0") as ep:
            pool = KVPoolClient(pod.spec, ep, engine.cfg)
            loader = KVLoader(pod.spec, ep, pool)
            try:
                ids = tuple(encode(TEXT + "three"))
                done = await prefill(client, "h-3", ids)
                assert done.cached_tokens > 0       # the pool served its prefix, and stored it
                pid = pod.procs["kvpool-0"].pid
                pod.kill("kvpool-0")
                assert not os.path.exists(f"/proc/{pid}")
                kv = await loader(done.kv, "h-3")   # pool dead after the store: the staged copy
                assert_exact(kv, reference_kv(engine, "h-3", ids), len(ids))
                # A fresh prefill with the pool dead: whole prompt computed, KV still handed over.
                ids4 = tuple(encode(TEXT + "four"))
                d4 = await prefill(client, "h-4", ids4)
                assert d4.cached_tokens == 0 and d4.computed_tokens == len(ids4)
                assert_exact(await loader(d4.kv, "h-4"), reference_kv(engine, "h-4", ids4), len(ids4))
                # Neither copy: the Load fails typed (the decode group reports it), never garbage.
                with pytest.raises(KVPoolUnavailable):
                    await loader(dataclasses.replace(d4.kv, digest=b"\x01" * 16), "h-4")
                # Back: the prefill's probe finds it, caching resumes, prefixes hit again.
                # Known down now: the next prefill does not even ask (no timeout paid again).
                d6 = await prefill(client, "h-6", ids4)
                assert (await client.call(PrefillStatsQuery(), timeout_s=5)).pool_skipped >= 1
                assert_exact(await loader(d6.kv, "h-6"), reference_kv(engine, "h-6", ids4), len(ids4))
                pod.start_service("kvpool-0")
                async with Loads(pod) as loads:
                    await until_prefill(loads, "pool_down", 0)
                ids5 = tuple(encode(TEXT + "five"))
                first = await prefill(client, "h-5a", ids5)   # the restarted pool is empty: stores it
                assert first.cached_tokens == 0
                d5 = await prefill(client, "h-5b", ids5)
                assert d5.cached_tokens == ((len(ids5) - 1) // 16) * 16, "the restarted pool is not hit"
                assert_exact(await loader(d5.kv, "h-5b"), reference_kv(engine, "h-5b", ids5), len(ids5))
            finally:
                await loader.close()
                await pool.close()
    finally:
        await client.close()
