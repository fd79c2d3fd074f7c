"""Bursts, deadlines and cancels on a whole pod: requests queue at the routers instead of
failing, every stream equals the reference, and afterwards every counter is back at its
baseline (router tables, decode batches and KV blocks, attention caches, prefill queues and
staged KV, KV pool pins), read from the services' own heartbeats."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.bench.soak import not_at_rest
from services.client import InferenceClient
from services.client.errors import DeadlineExceeded, NotFound
from services.model.engine import GenerationRequest, ReferenceEngine, prompt_ids
from services.model.sampling import SamplingParams
from services.pod.spec import services
from tests import faults
from tests.loads import Loads
from tests.pods import TestPod

pytestmark = pytest.mark.integration

SETTINGS = {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0},
            "routing": {"retain_finished_s": 1.0},
            # A small token budget per prefill pass: prompts of the burst are chunked across passes.
            "prefill_batch": {"max_requests": 8, "max_tokens": 48}}


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("burst", SETTINGS) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def sampling(i: int) -> dict:
    return dict(max_tokens=8 + i % 9) if i % 2 else dict(max_tokens=8 + i % 9, temperature=0.9, top_p=0.95, seed=i)


def prompt(i: int) -> str:
    return f"burst request {i}: " + "abcdefgh"[i % 8] * (i % 37)


async def at_baseline(pod: TestPod, loads: Loads, timeout_s: float = 30.0) -> None:
    """Until one fresh beat of every service shows it at rest (tables are kept
    ``retain_finished_s`` = 1 s here)."""
    names = [s.name for s in services(pod.spec) if s.role != "fabric"]
    bad: list[str] = []

    async def settled() -> None:
        nonlocal bad
        while True:
            now = {n: await loads.fresh(n) for n in names}
            bad = not_at_rest(pod.spec, now)
            if not bad:
                return
    try:
        await asyncio.wait_for(settled(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"counters not back at baseline after {timeout_s:g}s: {bad}") from None


async def test_burst_of_512_at_concurrency_256_queues_and_equals_the_reference(pod, reference) -> None:
    n, concurrency = 512, 256
    ids = [f"burst-{i}" for i in range(n)]
    gate = asyncio.Semaphore(concurrency)
    results: dict[int, object] = {}
    queued_seen = asyncio.Event()

    async with InferenceClient(pod.routers, timeout_s=float(os.environ.get("BURST_TIMEOUT_S", 300))) as client, Loads(pod) as loads:
        await at_baseline(pod, loads)
        before = await loads.fresh("prefill-0")

        async def one(i: int) -> None:
            async with gate:
                try:
                    results[i] = await client.complete(prompt(i), request_id=ids[i], **sampling(i))
                except Exception as exc:   # counted and shown below: a burst must produce none
                    results[i] = exc

        async def watch_queue() -> None:
            while True:
                beats = [await loads.fresh(r) for r in ("router-0", "router-1")]
                if any(b["queued"] > 0 for b in beats):
                    queued_seen.set()
                    return

        watcher = asyncio.create_task(watch_queue())
        burst = [asyncio.create_task(one(i)) for i in range(n)]
        # Mid-burst, the routers queue: a request whose deadline passes in the queue ends with
        # DEADLINE_EXCEEDED (the router's own, saying where it waited) and leaves nothing behind.
        await asyncio.wait_for(queued_seen.wait(), 60)
        async with InferenceClient(pod.routers[:1], timeout_s=0.6) as impatient:
            with pytest.raises(DeadlineExceeded, match="queue"):
                await impatient.complete("I cannot wait", request_id="impatient", max_tokens=8)
        await asyncio.gather(*burst)
        await watcher
        errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
        assert not errors, f"{len(errors)} of {n} failed, e.g. {next(iter(errors.values()))!r}"
        want = reference.generate([GenerationRequest(ids[i], prompt_ids(prompt(i)), SamplingParams(**sampling(i)))
                                   for i in range(n)])
        differ = [i for i in range(n) if results[i].token_ids != want[i].token_ids]
        assert not differ, f"{len(differ)} streams differ from the reference, e.g. request {differ[0]}"
        after = await loads.fresh("prefill-0")
        assert after["chunked_passes"] > before["chunked_passes"], "no prompt was chunked: the test proves less"
        assert after["batches"] - before["batches"] < n, "prompts were not batched into shared passes"
        await at_baseline(pod, loads)


async def test_a_deadline_ends_the_request_in_decode_and_in_prefill_and_frees_everything(pod) -> None:
    async with InferenceClient(pod.routers[:1], timeout_s=1.0, stall_s=5.0) as client, Loads(pod) as loads:
        await at_baseline(pod, loads)
        # In decode: a long generation outlives its deadline.
        with pytest.raises(DeadlineExceeded, match="decoding on decode-"):
            await client.complete("a long story " * 3, request_id="slow-decode", max_tokens=400,
                                  stop_token_ids=[258])
        # In prefill: the prefill is stopped (verified) while the request is on it.
        before = await loads.fresh("prefill-0")
        pid = pod.pids()["prefill-0"]
        faults.hang(pid)
        try:
            with pytest.raises(DeadlineExceeded, match="prefilling on prefill-0"):
                await client.complete("stuck in prefill", request_id="slow-prefill", max_tokens=8)
        finally:
            faults.resume(pid)
        after = await loads.fresh("prefill-0")
        assert after["cancelled"] == before["cancelled"] + 1, "the router did not tell the prefill to drop it"
        await at_baseline(pod, loads)


async def test_a_storm_of_cancels_and_disconnects_leaves_every_counter_at_baseline(pod) -> None:
    async with InferenceClient(pod.routers, timeout_s=60) as client, Loads(pod) as loads:
        await at_baseline(pod, loads)

        async def cancelled(i: int) -> None:
            rid, seen, asked = f"storm-{i}", 0, False
            async for d in client.generate(prompt(i), request_id=rid, max_tokens=200, stop_token_ids=[258]):
                seen += len(d.token_ids)
                if seen >= 1 + i % 5 and not asked:
                    if i % 2 == 0:
                        break                      # the client goes away: a disconnect
                    asked = True
                    try:
                        await client.cancel(rid)
                    except NotFound:               # only if it ended (and was forgotten) already
                        assert d.finish_reason, f"{rid} streaming, yet unknown to the routers"
        await asyncio.gather(*(cancelled(i) for i in range(96)))
        await at_baseline(pod, loads)


async def test_two_routers_share_the_backends_fairly(pod, reference) -> None:
    """Router-0 gets a deep queue first, router-1 a short one after: router-1's requests are
    served beside router-0's (each router takes its share of the room), not behind them."""
    order: list[str] = []
    async with InferenceClient(pod.routers[:1], timeout_s=300) as a, \
            InferenceClient(pod.routers[1:2], timeout_s=300) as b, Loads(pod) as loads:
        await at_baseline(pod, loads)

        async def one(client: InferenceClient, tag: str, i: int) -> None:
            res = await client.complete(prompt(i), request_id=f"fair-{tag}-{i}", max_tokens=8)
            assert res.token_ids == reference.generate([GenerationRequest(
                f"fair-{tag}-{i}", prompt_ids(prompt(i)), SamplingParams(max_tokens=8))])[0].token_ids
            order.append(tag)

        deep = [asyncio.create_task(one(a, "a", i)) for i in range(96)]
        while (await loads.fresh("router-0"))["queued"] == 0:
            pass
        short = [asyncio.create_task(one(b, "b", i)) for i in range(16)]
        await asyncio.gather(*deep, *short)
        await at_baseline(pod, loads)
    last_b = max(i for i, t in enumerate(order) if t == "b")
    # Strict FCFS across routers would finish every b after every queued a (last_b = 111).
    assert last_b < 96, f"router-1's requests waited behind router-0's queue: completion order {''.join(order)}"
