"""Attention rank core + server with the reference model: KV from the reference engine's prefill,
decode steps whose MoE layers go through real A2E/E2A over ``mem`` endpoints to in-process
expert instances; logits must equal the reference engine's decode logits bitwise."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager

import numpy as np
import pytest

from services.attention.core import AttentionCore, StepError, strip_routed_experts
from services.attention.kvcache import BadKV, KVBudgetExceeded, KVCache, UnknownSequence
from services.attention.server import AttentionServer, run_step
from services.common.wire import encode
from services.expert.core import ExpertInstance
from services.model import layers as L
from services.model.engine import GenerationRequest, ReferenceEngine, forward, prompt_ids
from services.model.sampling import SamplingParams, sample
from services.protocol.inference import KVRef
from services.protocol.step import Free, Load, Loaded, Run
from xccl_net.dispatch import A2EDispatcher, E2AHandler
from xccl_net.dispatch_core import DispatchLayout, Placement, weighted_sum
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.errors import XcclTimeout
from xccl_net.mem import MemoryHub

ENGINE = ReferenceEngine.from_preset("tiny", seed=5)
CFG = ENGINE.cfg
N_EXPERT_RANKS, SOURCES, MAX_BATCH = 4, 2, 4
LAYOUT = DispatchLayout(num_sources=SOURCES, num_ranks=N_EXPERT_RANKS, capacity_rows=MAX_BATCH * CFG.num_experts_per_tok,
                        hidden=CFG.hidden_size)
PLACEMENT = Placement.round_robin(CFG.n_routed_experts, N_EXPERT_RANKS, 2)
PROMPTS = ["The cat", "Hello, world! How", "a", "MoE layers route tokens", "xDeepServe", "pods"]
GREEDY = SamplingParams(max_tokens=8)


def prefilled(texts, rid_prefix):
    """Reference sequences after prefill (first token sampled), plus a copy of their KV then."""
    seqs = [ENGINE._start(GenerationRequest(f"{rid_prefix}{i}", prompt_ids(t), GREEDY)) for i, t in enumerate(texts)]
    ENGINE.prefill(seqs)
    kv = [[(k[:, :s.computed].copy(), v[:, :s.computed].copy()) for k, v in s.kv] for s in seqs]
    return seqs, kv


def reference_step(seqs):
    """One reference decode step; returns the logits it sampled from."""
    logits = forward(CFG, ENGINE.weights, ENGINE.rope, [(s, s.output[-1:]) for s in seqs])
    for s, row in zip(seqs, logits):
        ENGINE._emit(s, row)
    return logits


def attention_core(budget_blocks=64):
    cache = KVCache(CFG, budget_blocks=budget_blocks, block_size=16)
    return AttentionCore(CFG, strip_routed_experts(ENGINE.weights), cache, max_batch=MAX_BATCH)


def adopt_all(core, seqs, kv):
    for s, layers_kv in zip(seqs, kv):
        core.cache.adopt(s.req.request_id, layers_kv, s.computed, len(s.req.prompt_ids) + GREEDY.max_tokens)


def test_step_with_direct_experts_equals_reference_logits_bitwise():
    seqs, kv = prefilled(PROMPTS[:4], "d")
    core = attention_core()
    adopt_all(core, seqs, kv)
    for _ in range(4):
        rids = [s.req.request_id for s in seqs]
        toks, pos = [s.output[-1] for s in seqs], [s.computed for s in seqs]
        step = core.start(rids, toks, pos)
        while (call := step.advance()) is not None:
            lw = ENGINE.weights.layers[call.layer]
            y = L.run_experts_grouped(lw, call.h, call.ids)  # the full-model weights, outside the rank
            step.complete(weighted_sum(call.weights, y))
        want = reference_step(seqs)
        assert step.logits.tobytes() == want.tobytes()


def test_attention_rank_holds_no_routed_expert():
    core = attention_core()
    assert all(lw.experts == () for lw in core.weights.layers)
    with pytest.raises(ValueError, match="routed experts"):
        AttentionCore(CFG, ENGINE.weights, KVCache(CFG, budget_blocks=4, block_size=16), max_batch=2)


@asynccontextmanager
async def moe_pod():
    """Two attention sources and four expert instances on a mem hub, experts serving."""
    hub, ns = MemoryHub(), f"u{uuid.uuid4().hex[:8]}"
    eps = []

    async def ep(name, window, size, npu):
        e = await open_endpoint(EndpointConfig(name=name, namespace=ns, kind="mem", npu=npu, ring_slots=8,
                                               slot_bytes=64 * 1024, windows={window: size}), hub=hub)
        eps.append(e)
        return e

    try:
        attn = [await ep(f"attention-{s}-0", "e2a", LAYOUT.e2a_window_bytes, s) for s in range(SOURCES)]
        master = [await ep(f"decode-{s}", "x", 0, 10 + s) for s in range(SOURCES)]
        exps = [await ep(f"expert-{r}", "a2e", LAYOUT.a2e_window_bytes, 20 + r) for r in range(N_EXPERT_RANKS)]
        handlers = [E2AHandler(exps[r], rank=r, source_peers=[a.name for a in attn], placement=PLACEMENT,
                               layout=LAYOUT) for r in range(N_EXPERT_RANKS)]
        insts = [ExpertInstance(CFG, ENGINE.weights, PLACEMENT.hosted(r)) for r in range(N_EXPERT_RANKS)]

        async def serve(h, inst):
            while True:
                try:
                    await h.serve_event(select=inst.select, timeout_s=1.0, answer_timeout_s=5.0)
                except XcclTimeout:
                    continue

        dispatchers = [A2EDispatcher(attn[s], source=s, expert_peers=[e.name for e in exps], placement=PLACEMENT,
                                     layout=LAYOUT) for s in range(SOURCES)]
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(serve(h, i)) for h, i in zip(handlers, insts)]
            try:
                yield attn, master, dispatchers, handlers
            finally:
                for t in tasks:
                    t.cancel()
    finally:
        for e in eps:
            await e.close()


async def test_two_groups_at_different_rates_through_expert_instances_equal_reference():
    seqs_a, kv_a = prefilled(PROMPTS[:3], "a")
    seqs_b, kv_b = prefilled(PROMPTS[3:5], "b")
    cores = [attention_core(), attention_core()]
    adopt_all(cores[0], seqs_a, kv_a)
    adopt_all(cores[1], seqs_b, kv_b)
    steps = [0, 0]

    async def group(g, seqs, n_steps):
        for _ in range(n_steps):
            logits = await run_step(cores[g], dispatchers[g], steps[g], [s.req.request_id for s in seqs],
                                    [s.output[-1] for s in seqs], [s.computed for s in seqs])
            steps[g] += 1
            assert logits.tobytes() == reference_step(seqs).tobytes()

    async with moe_pod() as (_attn, _master, dispatchers, handlers):
        # Group 1 makes twice as many steps as group 0, concurrently: no lock-step.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(group(0, seqs_a, 3))
            tg.create_task(group(1, seqs_b, 6))
    moe = len(CFG.moe_layers)
    assert [sum(h.per_source[s][0] for h in handlers) for s in range(2)] == [3 * moe * 4, 6 * moe * 4]
    assert all(h.per_source[s][1] > 0 for h in handlers for s in range(2)), [h.per_source for h in handlers]


async def test_server_messages_load_run_free_and_refusals():
    seqs, kv = prefilled(PROMPTS[:2], "s")
    by_rid = {s.req.request_id: k for s, k in zip(seqs, kv)}

    async def load_kv(ref: KVRef, owner: str):
        return by_rid[owner]  # what the pool would return: the prefill's KV of that request

    cap = len(seqs[0].req.prompt_ids) + GREEDY.max_tokens
    core = attention_core(budget_blocks=3)  # 1 + 2 blocks for the two sequences
    async with moe_pod() as (attn, master, dispatchers, _h):
        srv = AttentionServer(attn[0], core, dispatchers[0], load_kv, master="decode-0")
        for s in seqs:
            ref = KVRef(num_tokens=s.computed, block_size=16, block_hashes=())
            got = await srv.handle(Load(s.req.request_id, ref, len(s.req.prompt_ids) + GREEDY.max_tokens))
            assert got == Loaded(s.req.request_id)
        over = await srv.handle(Load("big", KVRef(3, 16, ()), 17))  # 2 blocks, none left
        assert "KVBudgetExceeded" in over.error and "big" not in core.cache
        rids = tuple(s.req.request_id for s in seqs)
        for step in range(3):
            rep = await srv.handle(Run(step, rids, tuple(s.output[-1] for s in seqs), tuple(s.computed for s in seqs)))
            assert rep.error == "" and rep.step == step
            assert rep.logits.tobytes() == reference_step(seqs).tobytes()
        bad = await srv.handle(Run(9, ("nope",), (1,), (0,)))
        assert bad.step == 9 and "no KV for request 'nope'" in bad.error and bad.logits.shape == (0, CFG.vocab_size)
        bad = await srv.handle(Run(10, rids[:1], (1,), (cap,)))
        assert "position" in bad.error
        bad = await srv.handle(Run(11, rids[:1], (CFG.vocab_size,), (seqs[0].computed,)))
        assert "vocabulary" in bad.error
        assert (await srv.handle_frames([b"garbage"])).error.startswith("undecodable")
        assert "does not handle Loaded" in (await srv.handle(Loaded("x"))).error
        # The rank is still fine: the next step is exact.
        rep = await srv.handle(Run(12, rids, tuple(s.output[-1] for s in seqs), tuple(s.computed for s in seqs)))
        assert rep.logits.tobytes() == reference_step(seqs).tobytes()
        assert await srv.handle(Free(rids + ("unknown",))) is None
        assert len(core.cache) == 0 and core.cache.used_blocks == 0
        # Over XCCL: the master's messages in, replies back; a foreign sender is ignored.
        serving = asyncio.create_task(srv.serve())
        try:
            await attn[1].send("attention-0-0", encode(Free(("z",))))
            await master[0].send("attention-0-0", encode(Load(rids[0], KVRef(len(seqs[0].req.prompt_ids), 16, ()), cap)))
            src, frames = await master[0].recv(timeout_s=5.0)
            from services.common.wire import decode
            assert src == "attention-0-0" and decode(frames) == Loaded(rids[0])
            assert srv.stats["foreign_messages"] == 1
        finally:
            serving.cancel()


def test_kv_cache_is_block_accounted():
    cache = KVCache(CFG, budget_blocks=5, block_size=16)
    cache.allocate("a", 17)                 # 2 blocks
    assert cache.used_blocks == 2 and cache.free_blocks == 3
    seq = cache.get("a")
    assert seq.kv[0][0].shape == (CFG.num_key_value_heads, 17, CFG.head_dim)
    with pytest.raises(KVBudgetExceeded):
        cache.allocate("b", 64)             # 4 blocks > 3 free
    cache.allocate("a", 64)                 # replacing "a" frees its 2 first: 4 <= 5
    assert cache.used_blocks == 4 and len(cache) == 1
    with pytest.raises(KVBudgetExceeded):
        cache.allocate("c", CFG.max_position_embeddings + 1)
    with pytest.raises(BadKV):
        cache.adopt("d", [(np.zeros((1, 2, 3), np.float32),) * 2] * CFG.num_hidden_layers, 2, 8)
    with pytest.raises(BadKV):
        cache.adopt("d", [], 8, 8)          # no room for a decode position
    assert "d" not in cache
    assert cache.free(["a", "zz"]) == ["zz"] and cache.used_blocks == 0
    with pytest.raises(UnknownSequence):
        cache.get("a")


def test_step_refusals_change_nothing():
    seqs, kv = prefilled(PROMPTS[:1], "r")
    core = attention_core()
    adopt_all(core, seqs, kv)
    rid, n = seqs[0].req.request_id, seqs[0].computed
    before = [k.copy() for k, _ in core.cache.get(rid).kv]
    for args in (([], [], []), ([rid, rid], [1, 1], [n, n]), ([rid], [1, 2], [n]), ([rid], [1], [n + 1]),
                 ([rid] * 5, [1] * 5, [n] * 5), ([rid], [-1], [n])):
        with pytest.raises(StepError):
            core.start(*args)
    assert all(a.tobytes() == k.tobytes() for a, (k, _) in zip(before, core.cache.get(rid).kv))
    # Sampling the logits of a step gives the reference's greedy token.
    step = core.start([rid], [seqs[0].output[-1]], [n])
    while (call := step.advance()) is not None:
        step.complete(weighted_sum(call.weights, L.run_experts_grouped(ENGINE.weights.layers[call.layer],
                                                                       call.h, call.ids)))
    reference_step(seqs)
    assert sample(step.logits[0], GREEDY, rid, n + 1) == seqs[0].output[-1]


async def test_a_restarted_master_gets_a_whole_budget_and_the_old_incarnation_is_refused():
    seqs, kv = prefilled(PROMPTS[:2], "m")
    by_rid = {s.req.request_id: k for s, k in zip(seqs, kv)}

    async def load_kv(ref: KVRef, owner: str):
        return by_rid[owner]

    core = attention_core(budget_blocks=3)
    async with moe_pod() as (attn, _master, dispatchers, _h):
        srv = AttentionServer(attn[0], core, dispatchers[0], load_kv, master="decode-0")
        a, b = seqs
        cap_a = len(a.req.prompt_ids) + GREEDY.max_tokens
        cap_b = len(b.req.prompt_ids) + GREEDY.max_tokens
        ref = lambda s: KVRef(num_tokens=s.computed, block_size=16, block_hashes=())  # noqa: E731
        assert await srv.handle(Load(a.req.request_id, ref(a), cap_a, master_epoch="old")) == Loaded(a.req.request_id)
        assert len(core.cache) == 1
        # The master restarted (new epoch): what the old one left is dropped, the budget is whole.
        got = await srv.handle(Load(b.req.request_id, ref(b), cap_b, master_epoch="new"))
        assert got == Loaded(b.req.request_id) and core.cache.request_ids() == [b.req.request_id]
        # The old incarnation, continued after a hang, is answered but changes nothing.
        late = await srv.handle(Load(a.req.request_id, ref(a), cap_a, master_epoch="old"))
        assert "replaced incarnation" in late.error and core.cache.request_ids() == [b.req.request_id]
        run = await srv.handle(Run(0, (b.req.request_id,), (b.output[-1],), (b.computed,), master_epoch="old"))
        assert "replaced incarnation" in run.error
        assert await srv.handle(Free((b.req.request_id,), master_epoch="old")) is None
        assert core.cache.request_ids() == [b.req.request_id] and srv.stats["stale_master_messages"] == 3
