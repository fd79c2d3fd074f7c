"""The scheduler drives the real model (computed in-process, per the Run it plans) and must give
exactly ``ReferenceEngine.generate``'s tokens: greedy and seeded sampling, under continuous
batching with a batch limit and KV backpressure smaller than the workload, across two ranks."""

from __future__ import annotations

import pytest

from services.decode.core import CoreConfig, DecodeCore, Emit, Request, SendFree, SendLoad
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams, sample
from services.model.tokenizer import encode
from services.protocol.inference import KVRef

PROMPTS = ["Hello, world", "The quick brown fox", "a", "MoE routes tokens to experts", "xDeepServe",
           "disaggregated prefill", "zz", "batch invariance holds"]


@pytest.fixture(scope="module")
def tiny() -> ReferenceEngine:
    return ReferenceEngine.from_preset("tiny", seed=0)


def workload() -> list[GenerationRequest]:
    params = [SamplingParams(max_tokens=12, stop_token_ids=()),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=9),
              SamplingParams(temperature=1.2, top_k=12, max_tokens=15, stop_token_ids=()),
              SamplingParams(max_tokens=5)]
    return [GenerationRequest(f"d{i}", tuple(encode(p)), params[i % len(params)]) for i, p in enumerate(PROMPTS)]


def test_scheduler_tokens_equal_reference_engine(tiny: ReferenceEngine) -> None:
    cfg, w, rope = tiny.cfg, tiny.weights, tiny.rope
    reqs = workload()
    expected = {r.request_id: r.token_ids for r in tiny.generate(reqs)}

    c = DecodeCore(CoreConfig(block_size=4, kv_blocks=24, max_batch=3, ranks=("a0", "a1"), max_queue=16,
                              max_positions=cfg.max_position_embeddings))
    got: dict[str, list[int]] = {}
    prefilled: dict[str, SequenceState] = {}
    ranks: dict[str, dict[str, SequenceState]] = {"a0": {}, "a1": {}}
    pending: list = []
    for r in reqs:
        # What prefill does: prompt forward, first token at position len(prompt).
        s = SequenceState(r, new_kv(cfg, len(r.prompt_ids) + r.params.max_tokens))
        first = sample(forward(cfg, w, rope, [(s, r.prompt_ids)])[0], r.params, r.request_id, len(r.prompt_ids))
        got[r.request_id] = [first]
        if first in r.params.stop_token_ids:
            continue
        prefilled[r.request_id] = s
        pending += c.admit(Request(r.request_id, len(r.prompt_ids), r.params, KVRef(len(r.prompt_ids), 4, ()),
                                   first, 1, "router-0"))
    assert c.queued > 0, "the workload must exceed the batch/KV limits to exercise backpressure"
    finals = {}
    steps = 0
    while pending or c.has_running or c.queued:
        effects, pending = pending, []
        for e in effects:
            if isinstance(e, SendLoad):
                s = prefilled.pop(e.load.request_id)
                assert s.computed == e.load.kv.num_tokens and s.kv[0][0].shape[1] == e.load.capacity
                ranks[e.rank][e.load.request_id] = s
                pending += c.loaded(e.load.request_id, e.rank)
            elif isinstance(e, SendFree):
                for rid in e.free.request_ids:
                    del ranks[e.rank][rid]
            elif isinstance(e, Emit):
                t = e.tokens
                assert t.index == len(got[t.request_id])
                got[t.request_id] += t.token_ids
                if t.finish_reason:
                    finals[t.request_id] = t.finish_reason
        plan = c.plan_step()
        if plan is None:
            continue
        steps += 1
        results = {}
        for rank, run in plan.runs:
            seqs = [ranks[rank][rid] for rid in run.request_ids]
            assert all(s.computed == p for s, p in zip(seqs, run.positions))
            results[rank] = forward(cfg, w, rope, [(s, [t]) for s, t in zip(seqs, run.tokens)])
        pending += c.complete_step(plan.step, results)
    assert {k: tuple(v) for k, v in got.items()} == expected
    assert ranks == {"a0": {}, "a1": {}}, "every sequence was freed on its rank"
    assert c.free_blocks == 24 and steps == c.stats.steps
    assert set(finals.values()) <= {"stop", "length"}
