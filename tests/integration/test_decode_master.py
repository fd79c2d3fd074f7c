"""The decode master as a real process (fabric simulator + decode-0), driven over its real
sockets: the test plays the router (RPC Admit/Cancel, token pushes) and the group's two
attention ranks (XCCL endpoints that compute the real model for each Run). The tokens pushed
must equal ``ReferenceEngine.generate``; the rank's view of Load/Run/Free must stay consistent;
a rank that stops answering ends its requests with an UNAVAILABLE error while the master serves on.

(The full pod path with real attention/expert/kvpool/prefill services is test_decode_e2e.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from tests.waiting import Changed

from services.common.rpc import RemoteError, RpcClient
from services.common.status import Code
from services.common.wire import decode, encode
from services.decode.messages import DecodeStats, DecodeStatsQuery
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams, sample
from services.model.tokenizer import encode as tok
from services.pod.spec import address
from services.protocol.inference import Admit, Cancel, KVRef, Sampling, Tokens
from services.protocol.step import Free, Load, Loaded, Logits, Run
from tests.pods import TestPod, test_endpoint
from xccl_net.errors import XcclError, XcclTimeout

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK, KV_BLOCKS, MAX_BATCH = 16, 16, 3     # 8 blocks per attention rank
RANKS = ("attention-0-0", "attention-0-1")


@pytest.fixture(scope="module")
def pod():
    procs = TestPod.create("dm", {
        "decode": {"groups": 1, "attention_per_group": 2, "max_batch": MAX_BATCH, "kv_blocks": KV_BLOCKS},
        "kv_pool": {"block_size": BLOCK}, "heartbeat": {"interval_s": 0.05, "suspect_after_s": 0.2,
                                                        "dead_after_s": 0.4}})
    try:
        procs.start(only=["decode-0"])
        yield procs
    finally:
        codes = procs.stop()
    assert codes["decode-0"] == 0, codes


@pytest.fixture(scope="module")
def engine(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


CHANGED = Changed()  # module scope: the fixtures' doubles and the tests share one loop


@dataclass
class ModelRank:
    """An attention rank's protocol, computed in the test process with the whole model."""
    name: str
    engine: ReferenceEngine
    prefilled: dict[str, SequenceState]
    ep: object = None
    seqs: dict[str, SequenceState] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)
    frees: list[str] = field(default_factory=list)
    runs: int = 0
    hold_runs: asyncio.Event | None = None   # a rank that hangs mid-decode until the Event is set
    hold_loads: asyncio.Event | None = None  # while set to an unset Event, Loads wait for it
    errors: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)

    async def serve(self) -> None:
        e = self.engine
        while True:
            CHANGED.notify()  # whatever the last message did is visible now
            try:
                src, frames = await self.ep.recv(timeout_s=1.0)
            except XcclTimeout:
                continue
            msg = decode(frames)
            if isinstance(msg, Load):
                if self.hold_loads is not None:
                    self.held.append(msg.request_id)
                    CHANGED.notify()
                    await self.hold_loads.wait()
                s = self.prefilled.pop(msg.request_id)
                if s.computed != msg.kv.num_tokens or s.kv[0][0].shape[1] != msg.capacity:
                    self.errors.append(f"Load {msg} does not fit the prefilled state")
                self.seqs[msg.request_id] = s
                self.loads.append(msg.request_id)
                try:
                    await self.ep.send(src, encode(Loaded(msg.request_id)), timeout_s=2)
                except XcclError as exc:
                    self.errors.append(f"Loaded {msg.request_id}: {exc!r}")
            elif isinstance(msg, Run):
                if self.hold_runs is not None:
                    await self.hold_runs.wait()
                self.runs += 1
                seqs = [self.seqs[r] for r in msg.request_ids]
                if [s.computed for s in seqs] != list(msg.positions):
                    have = [s.computed for s in seqs]
                    self.errors.append(f"step {msg.step}: positions {msg.positions} != cache {have}")
                logits = forward(e.cfg, e.weights, e.rope, [(s, [t]) for s, t in zip(seqs, msg.tokens)])
                await self.ep.send(src, encode(Logits(msg.step, logits)))
            elif isinstance(msg, Free):
                for rid in msg.request_ids:
                    self.seqs.pop(rid, None)
                    self.frees.append(rid)


class Router:
    """The router's side: Admit over RPC, pushed Tokens collected per request."""

    def __init__(self, pod: TestPod) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, Tokens] = {}
        self.done: dict[str, asyncio.Event] = {}
        self.bad: list[str] = []
        self.client = RpcClient(address(pod.spec, "decode-0", "rpc"), on_push=self._on_push)

    async def admit(self, a: Admit) -> None:
        self.tokens[a.request_id] = [a.next_token]      # the prefill's token is output 0
        await self.client.call(a, timeout_s=5)

    def _on_push(self, msg: Tokens) -> None:
        got = self.tokens.setdefault(msg.request_id, [])
        if msg.index != len(got):
            self.bad.append(f"{msg.request_id}: index {msg.index}, have {len(got)}")
        got += msg.token_ids
        if msg.finish_reason:
            self.final[msg.request_id] = msg
            self.done.setdefault(msg.request_id, asyncio.Event()).set()
        CHANGED.notify()

    async def wait(self, rids, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            for rid in rids:
                await self.done.setdefault(rid, asyncio.Event()).wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def group(pod, engine):
    prefilled: dict[str, SequenceState] = {}
    ranks = [ModelRank(n, engine, prefilled) for n in RANKS]
    router = Router(pod)
    async with test_endpoint(pod.spec, RANKS[0]) as ep0, test_endpoint(pod.spec, RANKS[1]) as ep1:
        ranks[0].ep, ranks[1].ep = ep0, ep1
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(r.serve()) for r in ranks]
            yield pod, engine, ranks, router, prefilled
            for t in tasks:
                t.cancel()
    await router.client.close()


def prefill(engine: ReferenceEngine, prefilled: dict, rid: str, text: str, p: SamplingParams) -> Admit:
    """What the prefill service does, in-process; returns the Admit the router would send."""
    ids = tuple(tok(text))
    s = SequenceState(GenerationRequest(rid, ids, p), new_kv(engine.cfg, len(ids) + p.max_tokens))
    logits = forward(engine.cfg, engine.weights, engine.rope, [(s, ids)])
    first = sample(logits[0], p, rid, len(ids))
    prefilled[rid] = s
    return Admit(rid, len(ids), Sampling.of(p), KVRef(len(ids), BLOCK, ()), first, 1, "router-0")


async def stats(router: Router) -> DecodeStats:
    return await router.client.call(DecodeStatsQuery(), timeout_s=5)


async def test_tokens_equal_the_reference_under_batching_and_backpressure(group) -> None:
    pod, engine, ranks, router, prefilled = group
    params = [SamplingParams(max_tokens=20, stop_token_ids=()),
              SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_tokens=14),
              SamplingParams(temperature=1.3, top_k=16, max_tokens=24, stop_token_ids=()),
              SamplingParams(max_tokens=9)]
    texts = ["Hello, world", "The quick brown fox", "MoE routes tokens", "a", "xDeepServe decodes",
             "batch invariance", "zz", "KV blocks are the currency"]
    admits = [prefill(engine, prefilled, f"t{i}", t, params[i % 4]) for i, t in enumerate(texts)]
    for a in admits:
        await router.admit(a)
    assert (await stats(router)).queued > 0, "8 requests over a batch of 3 must queue"
    await router.wait([a.request_id for a in admits])
    reqs = [GenerationRequest(f"t{i}", tuple(tok(t)), params[i % 4]) for i, t in enumerate(texts)]
    for ref in engine.generate(reqs):
        assert tuple(router.tokens[ref.request_id]) == ref.token_ids
        assert router.final[ref.request_id].finish_reason == ref.finish_reason
    assert router.bad == [] and all(not r.errors for r in ranks), [r.errors for r in ranks] + router.bad
    st = await stats(router)
    assert st.free_kv_blocks == KV_BLOCKS and st.running == 0 and st.queued == 0
    assert st.queue_peak >= 1 and st.finished >= 8 and st.tokens == sum(len(v) - 1 for v in router.tokens.values())
    assert all(r.loads for r in ranks), "both attention ranks got sequences"
    # The last Free goes out after the last push.
    await CHANGED.until(lambda: not any(sorted(r.loads) != sorted(r.frees) or r.seqs for r in ranks), 5)


async def test_cancel_and_refusals(group) -> None:
    pod, engine, ranks, router, prefilled = group
    long = prefill(engine, prefilled, "c-long", "cancel me while I decode",
                   SamplingParams(max_tokens=90, stop_token_ids=()))
    await router.admit(long)
    # Wait until it streams, then cancel: Ok, no final push (the router asked), blocks back, Free sent.
    await CHANGED.until(lambda: len(router.tokens["c-long"]) >= 4, 20)
    # Another router's Cancel (a router that lost the id to this one) leaves it running.
    with pytest.raises(RemoteError) as e:
        await router.client.call(Cancel("c-long", "router-9"), timeout_s=5)
    assert e.value.code == "NOT_FOUND" and "router-0" in e.value.message
    have = len(router.tokens["c-long"])
    await CHANGED.until(lambda: len(router.tokens["c-long"]) > have + 1, 20)
    await router.client.call(Cancel("c-long", "router-0"), timeout_s=5)
    await CHANGED.until(lambda: "c-long" in ranks[0].frees + ranks[1].frees, 10)
    st = await stats(router)
    assert st.free_kv_blocks == KV_BLOCKS and st.running == 0 and st.cancelled >= 1
    assert len(router.tokens["c-long"]) < 90 and "c-long" not in router.final
    with pytest.raises(RemoteError) as e:
        await router.client.call(Cancel("c-long"), timeout_s=5)
    assert e.value.code == "NOT_FOUND"
    # Needs more KV than the group has at all: RESOURCE_EXHAUSTED, so the router tries elsewhere.
    huge = Admit("huge", 100, Sampling.of(SamplingParams(max_tokens=200)), KVRef(100, BLOCK, ()), 65, 1, "router-0")
    with pytest.raises(RemoteError) as e:
        await router.client.call(huge, timeout_s=5)
    assert e.value.code == "RESOURCE_EXHAUSTED" and "KV blocks" in e.value.message
    bad = [Admit("b1", 5, Sampling.of(SamplingParams()), KVRef(9, BLOCK, ()), 65, 1, "router-0"),
           Admit("b2", 5, Sampling(0.0, 2.0, 0, None, 8, ()), KVRef(5, BLOCK, ()), 65, 1, "router-0"),
           Admit("b3", 5, Sampling.of(SamplingParams()), KVRef(5, BLOCK, ()), 65, 1, ""),
           Tokens("b4", 0, ())]
    for m in bad:
        with pytest.raises(RemoteError) as e:
            await router.client.call(m, timeout_s=5)
        assert e.value.code == "INVALID_ARGUMENT", m
    assert pod.alive("decode-0")


async def test_silent_rank_ends_its_requests_with_an_error_and_is_taken_back_when_it_answers(group) -> None:
    pod, engine, ranks, router, prefilled = group
    before = await stats(router)
    ranks[1].hold_runs = asyncio.Event()
    admits = [prefill(engine, prefilled, f"s{i}", f"silent rank {i}", SamplingParams(max_tokens=6, stop_token_ids=()))
              for i in range(2)]
    for a in admits:
        await router.admit(a)
    await router.wait([a.request_id for a in admits], timeout_s=30)
    outcomes = {a.request_id: router.final[a.request_id] for a in admits}
    errors = [t for t in outcomes.values() if t.finish_reason == "error"]
    assert len(errors) == 1 and errors[0].code is Code.UNAVAILABLE and "attention-0-1" in errors[0].error
    fine = [t for t in outcomes.values() if t.finish_reason == "length"]
    assert len(fine) == 1
    st = await stats(router)
    assert st.live_ranks == 1 and st.failed == before.failed + 1 and st.free_kv_blocks == KV_BLOCKS // 2
    # The master serves on, with the rank that answers.
    a = prefill(engine, prefilled, "after", "still decoding", SamplingParams(max_tokens=4, stop_token_ids=()))
    await router.admit(a)
    await router.wait(["after"])
    assert router.final["after"].finish_reason == "length" and len(router.tokens["after"]) == 4
    # The slow rank's late answer shows it is there: it takes sequences again, with a clean cache.
    ranks[1].hold_runs.set()
    ranks[1].hold_runs = None
    async with asyncio.timeout(10):
        while (await stats(router)).live_ranks != 2 or ranks[1].seqs:
            await asyncio.sleep(0.01)   # the late answer reaching the master has no event here
    both = [prefill(engine, prefilled, f"back{i}", f"both ranks {i}", SamplingParams(max_tokens=3, stop_token_ids=()))
            for i in range(2)]
    for a in both:
        await router.admit(a)
    await router.wait([a.request_id for a in both])
    assert {router.final[a.request_id].finish_reason for a in both} == {"length"}
    assert {"back0", "back1"} & set(ranks[1].loads)
    assert pod.alive("decode-0")


async def test_sigterm_drains_then_hands_running_requests_back(group) -> None:
    """Runs last (it stops decode-0). A sequence still running at the drain deadline ends with
    finish_reason "cancelled", which tells its router to replay it on another group."""
    pod, engine, ranks, router, prefilled = group
    ranks[0].hold_loads = asyncio.Event()
    a = prefill(engine, prefilled, "drain", "still loading at shutdown", SamplingParams(max_tokens=20))
    await router.admit(a)
    await CHANGED.until(lambda: "drain" in ranks[0].held, 10)
    proc = pod.procs["decode-0"]
    os.kill(proc.pid, signal.SIGTERM)
    # Admissions are refused as soon as the drain starts (a repeated Admit of one id is
    # idempotent, so asking until refused admits nothing twice).
    late = prefill(engine, prefilled, "late", "too late", SamplingParams())
    async with asyncio.timeout(2):
        while True:
            try:
                await router.admit(late)
            except RemoteError as exc:
                assert exc.code == "UNAVAILABLE" and "shutting down" in exc.message
                break
    await router.wait(["drain"], timeout_s=15)
    assert router.final["drain"].finish_reason == "cancelled" and router.final["drain"].index == 1
    ranks[0].hold_loads.set()
    assert await asyncio.to_thread(proc.wait, 15) == 0
