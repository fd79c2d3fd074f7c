"""A dead or hung KV pool costs prefix hits, never a request (whole pod, real processes).

kill -9 of kvpool-0 (the only pool node): concurrent greedy and seeded streams all equal the
reference engine; restarted, it is hit again. SIGSTOP: requests complete exact while it is
stopped (not after); continued, later requests are exact and its pins return to baseline.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from services.client.sdk import InferenceClient
from services.common.health import probe
from services.common.liveness import Liveness
from services.model.engine import ReferenceEngine
from services.pod.spec import address
from services.run import EXIT_STALE
from tests.integration.test_pod_e2e import expected
from tests.loads import Loads
from tests.faults import proc_state
from tests.pods import TestPod

pytestmark = pytest.mark.integration

PROMPTS = ["The pool is a cache, not a point of failure", "disaggregated prefill and decode",
           "0123456789" * 3, "MoE routes tokens to experts", "a", "KV moves straight from prefill to decode"]
SHARED = "A shared system prompt, long enough to fill several KV blocks of sixteen tokens each. " * 2


def sampling_for(i: int) -> dict:
    base = {"max_tokens": 32 + 3 * i}
    if i % 2:
        base |= {"temperature": 0.8, "top_p": 0.9, "top_k": 30, "seed": 77 + i}
    return base


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("kvf", {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0},
                                 "kv_pool": {"lease_s": 2.0, "probe_interval_s": 0.1}}) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


async def all_exact(client: InferenceClient, reference: ReferenceEngine, tag: str) -> None:
    ids = [f"{tag}-{i}" for i in range(len(PROMPTS))]
    results = await asyncio.gather(*(client.complete(p, request_id=ids[i], **sampling_for(i))
                                     for i, p in enumerate(PROMPTS)))
    for i, (rid, res) in enumerate(zip(ids, results)):
        assert res.token_ids == expected(reference, rid, PROMPTS[i], sampling_for(i)), f"{rid} differs"


async def until(loads: Loads, name: str, cond, timeout_s: float = 30.0) -> dict:
    """The first heartbeat load of ``name`` published from now on that satisfies ``cond``."""
    async def wait() -> dict:
        while not cond(load := await loads.fresh(name)):
            pass
        return load
    return await asyncio.wait_for(wait(), timeout_s)


async def test_1_killed_pool_costs_no_request(pod, reference) -> None:
    pid = pod.procs["kvpool-0"].pid
    pod.kill("kvpool-0")
    assert not os.path.exists(f"/proc/{pid}"), "kvpool-0 is still there"
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        await all_exact(client, reference, "dead")
        await all_exact(client, reference, "dead2")    # and again, now that it is known down
        load = await loads.fresh("prefill-0")
        assert load["pool_down"] == 1 and load["pool_skipped"] > 0


async def test_2_restarted_pool_is_hit_again(pod, reference) -> None:
    pod.start_service("kvpool-0")
    assert probe(address(pod.spec, "kvpool-0", "health")) == "SERVING"
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        await until(loads, "prefill-0", lambda ld: ld["pool_down"] == 0)
        before = await loads.fresh("kvpool-0")
        kw = {"max_tokens": 8}
        first = await client.complete(SHARED + "first question", request_id="hit-1", **kw)
        second = await client.complete(SHARED + "second question", request_id="hit-2", **kw)
        after = await loads.fresh("kvpool-0")
    assert first.token_ids == expected(reference, "hit-1", SHARED + "first question", kw)
    assert second.token_ids == expected(reference, "hit-2", SHARED + "second question", kw)
    assert after["hits"] - before["hits"] >= 2, (before, after)


async def test_3_stopped_pool_costs_no_request_and_its_pins_come_back(pod, reference) -> None:
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        base = (await loads.fresh("kvpool-0"))["pinned_blocks"]
        pid = pod.procs["kvpool-0"].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            # Delivery is asynchronous: we are its parent, so wait for the stop to be reported.
            got, status = os.waitpid(pid, os.WUNTRACED)
            assert got == pid and os.WIFSTOPPED(status) and proc_state(pid) == "T"
            await all_exact(client, reference, "stopped")
            assert proc_state(pid) == "T", "the requests waited for the pool to be continued"
            await all_exact(client, reference, "stopped2")
            # The fault lasts until the pool's peers declare it dead (the requests alone may be
            # done sooner): only then is its incarnation stale when it is continued.
            await loads.until(lambda: loads.sub.detector.state("kvpool-0") is Liveness.DEAD,
                              3 * pod.spec.heartbeat.dead_after_s + 5)
            assert proc_state(pid) == "T"
        finally:
            os.kill(pid, signal.SIGCONT)
        # Continued after its peers declared it dead, it ends its stale incarnation (exit 75)
        # instead of serving on as an epoch nobody listens to; its supervisor restarts it.
        assert await asyncio.to_thread(pod.procs["kvpool-0"].wait, 15) == EXIT_STALE
        pod.start_service("kvpool-0")
        await until(loads, "prefill-0", lambda ld: ld["pool_down"] == 0)
        await all_exact(client, reference, "continued")
        # Nothing pinned for clients that moved on: the new incarnation starts clean and every
        # pin it gives is returned.
        await until(loads, "kvpool-0", lambda ld: ld["pinned_blocks"] == base and ld["writing_blocks"] == 0)
        # Still a working cache.
        kw = {"max_tokens": 4}
        before = await loads.fresh("kvpool-0")
        for rid in ("cont-1", "cont-2"):
            res = await client.complete(SHARED + "again", request_id=rid, **kw)
            assert res.token_ids == expected(reference, rid, SHARED + "again", kw)
        assert (await loads.fresh("kvpool-0"))["hits"] > before["hits"]
