"""Prefill core: request checks, and the forward pass with a cached prefix and in batches gives
the reference engine's first token and KV bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, forward, new_kv
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.prefill.core import InvalidPrefill, Job, PrefillModel, check, plan_pass
from services.protocol.inference import Prefill, Sampling

GREEDY = Sampling.of(SamplingParams(max_tokens=8))
SEEDED = Sampling.of(SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=8))


@pytest.fixture(scope="module")
def tiny() -> ReferenceEngine:
    return ReferenceEngine.from_preset("tiny", seed=0)


def full_prefill(tiny: ReferenceEngine, rid: str, tokens: tuple[int, ...], params: SamplingParams):
    s = SequenceState(GenerationRequest(rid, tokens, params), new_kv(tiny.cfg, len(tokens)))
    logits = forward(tiny.cfg, tiny.weights, tiny.rope, [(s, tokens)])
    return s.kv, logits[0]


@pytest.mark.parametrize("msg, words", [
    (Prefill("", (1, 2), GREEDY), "request_id is empty"),
    (Prefill("r", (), GREEDY), "token_ids is empty"),
    (Prefill("r", (1, 259), GREEDY), "token id 259 is outside the vocabulary"),
    (Prefill("r", (1, -3), GREEDY), "token id -3"),
    (Prefill("r", (1,) * 512, GREEDY), "leave no position"),
    (Prefill("r", (1, 2, 3), GREEDY, position_offset=2), "position_offset 2 must be len(token_ids) = 3"),
    (Prefill("r", (1, 2), Sampling(0.0, 1.5, 0, None, 8, ())), "top_p"),
    (Prefill("r", (1, 2), Sampling(0.0, 1.0, 0, None, 0, ())), "max_tokens"),
])
def test_check_names_the_problem(tiny: ReferenceEngine, msg: Prefill, words: str) -> None:
    with pytest.raises(InvalidPrefill, match=None) as e:
        check(tiny.cfg, msg)
    assert words in str(e.value)


def test_check_accepts_fresh_and_replayed_requests(tiny: ReferenceEngine) -> None:
    assert check(tiny.cfg, Prefill("r", (256, 65, 66), GREEDY)).max_tokens == 8
    assert check(tiny.cfg, Prefill("r", (256, 65, 66), SEEDED, position_offset=3)).seed == 5
    # A replay may carry prompt + generated tokens whose sum with max_tokens exceeds the model.
    check(tiny.cfg, Prefill("r", (65,) * 510, GREEDY, position_offset=510))


def test_first_token_and_kv_match_the_reference_with_prefix_and_in_batch(tiny: ReferenceEngine) -> None:
    model = PrefillModel(tiny.cfg, tiny.weights)
    shared = tuple(encode("a long shared system prompt that the KV pool caches, block after block"))
    prompts = [shared + tuple(encode(s, add_bos=False)) for s in (" one", " and two", "?")]
    params = [SamplingParams(max_tokens=4), SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=4),
              SamplingParams(temperature=1.1, top_k=9, max_tokens=4)]
    expect = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        gen = tiny.generate([GenerationRequest(f"r{i}", p, SamplingParams(**{**_fields(sp), "max_tokens": 1}))])
        kv, _ = full_prefill(tiny, f"r{i}", p, sp)
        expect.append((gen[0].token_ids[0], kv))
    cut = 32
    cached_kv, _ = full_prefill(tiny, "x", shared[:cut], SamplingParams())
    jobs = [Job("r0", prompts[0], params[0], 0, []),
            Job("r1", prompts[1], params[1], cut, cached_kv),
            Job("r2", prompts[2], params[2], len(prompts[2]) - 1, full_prefill(tiny, "y", prompts[2][:-1],
                                                                                SamplingParams())[0])]
    results = model.run(jobs)                       # one batch, three different cached lengths
    alone = [model.run([j])[0] for j in jobs]
    for (tok, kv), res, one in zip(expect, results, alone):
        assert res.next_token == tok == one.next_token
        for (k, v), (rk, rv) in zip(kv, res.kv):
            assert np.array_equal(k, rk) and np.array_equal(v, rv)


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__slots__}


def test_job_must_leave_a_token_to_compute() -> None:
    with pytest.raises(ValueError, match="must leave a token"):
        Job("r", (1, 2, 3), SamplingParams(), 3, [])


def test_plan_pass_is_fcfs_within_budgets_and_chunks_the_prompt_that_does_not_fit() -> None:
    assert plan_pass([10, 20, 30, 5000, 1], 8, 100) == [10, 20, 30, 40]   # the 4th: a 40-position chunk
    assert plan_pass([10, 20, 30], 2, 10_000) == [10, 20]                # request cap
    assert plan_pass([5000, 1], 8, 100) == [100]                         # a long prompt: one chunk per pass
    assert plan_pass([10, 90, 1], 8, 100) == [10, 90]                    # budget used up exactly
    assert plan_pass([], 8, 100) == []


def test_chunked_prefill_gives_the_bits_of_a_whole_one(tiny: ReferenceEngine) -> None:
    """Passes of 7 positions, two prompts interleaved with a cached prefix: the same first
    token and the same KV, bit for bit, as each prompt alone in one pass."""
    model = PrefillModel(tiny.cfg, tiny.weights)
    a = tuple(encode("a prompt long enough to take several chunks of seven positions each"))
    b = tuple(encode("another one, seeded"))
    cut = 16
    jobs = [Job("a", a, SamplingParams(max_tokens=4), 0, []),
            Job("b", b, SamplingParams(temperature=0.9, seed=3, max_tokens=4), cut,
                full_prefill(tiny, "x", b[:cut], SamplingParams())[0])]
    whole = [model.run([j])[0] for j in jobs]
    states = [model.start(j) for j in jobs]
    done: dict[str, object] = {}
    while len(done) < 2:
        live = [(j, s) for j, s in zip(jobs, states) if j.request_id not in done]
        plan = plan_pass([len(j.tokens) - s.computed for j, s in live], 8, 7)
        for (j, s), res in zip(live, model.step([(j, s, n) for (j, s), n in zip(live, plan)])):
            if res is not None:
                done[j.request_id] = res
    for j, one in zip(jobs, whole):
        res = done[j.request_id]
        assert res.next_token == one.next_token
        for (k, v), (rk, rv) in zip(one.kv, res.kv):
            assert np.array_equal(k, rk) and np.array_equal(v, rv)
