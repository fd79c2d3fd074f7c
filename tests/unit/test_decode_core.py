"""Decode master scheduler (pure core): batching, KV backpressure, FIFO, finish, cancel, lifecycle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.decode.core import (
    TRANSITIONS, CoreConfig, DecodeCore, Emit, IllegalTransition, Refused, Request, SendFree, SendLoad,
    SeqEvent, SeqState, StepRefused, blocks_for, next_state)
from services.common.status import Code
from services.model.sampling import SamplingParams
from services.protocol.inference import KVRef

VOCAB = 32
STOP = 31


def req(rid: str, prompt_len: int = 4, max_tokens: int = 4, *, generated: int = 1, next_token: int = 5,
        stop: tuple[int, ...] = (STOP,), router: str = "router-0") -> Request:
    kv = KVRef(prompt_len + generated - 1, 4, ())
    return Request(rid, prompt_len, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop), kv,
                   next_token, generated, router)


def core(*, block_size: int = 4, kv_blocks: int = 64, max_batch: int = 4, ranks=("a0",), max_queue: int = 8,
         max_positions: int = 512) -> DecodeCore:
    return DecodeCore(CoreConfig(block_size, kv_blocks, max_batch, tuple(ranks), max_queue, max_positions))


def onehot(tokens: list[int]) -> np.ndarray:
    """Logits whose greedy choice is ``tokens[i]`` for row i."""
    out = np.zeros((len(tokens), VOCAB), np.float32)
    out[np.arange(len(tokens)), tokens] = 1.0
    return out


def loads(effects) -> list[str]:
    return [e.load.request_id for e in effects if isinstance(e, SendLoad)]


def frees(effects) -> list[str]:
    return [rid for e in effects if isinstance(e, SendFree) for rid in e.free.request_ids]


def emitted(effects) -> list:
    return [e.tokens for e in effects if isinstance(e, Emit)]


def load_all(c: DecodeCore, effects) -> None:
    for e in effects:
        if isinstance(e, SendLoad):
            assert c.loaded(e.load.request_id, e.rank) == []


def run_step(c: DecodeCore, pick) -> list:
    """One step; ``pick(request_id) -> token`` decides each row's greedy token."""
    plan = c.plan_step()
    assert plan is not None
    results = {rank: onehot([pick(rid) for rid in run.request_ids]) for rank, run in plan.runs}
    return c.complete_step(plan.step, results)


def test_batch_limit_and_continuous_batching() -> None:
    c = core(max_batch=2)
    eff = c.admit(req("r1", max_tokens=2)) + c.admit(req("r2", max_tokens=5)) + c.admit(req("r3"))
    assert loads(eff) == ["r1", "r2"] and c.queued == 1
    load_all(c, eff)
    plan = c.plan_step()
    assert plan is not None and plan.runs[0][1].request_ids == ("r1", "r2")
    out = c.complete_step(plan.step, {"a0": onehot([7, 8])})
    # r1 reached max_tokens=2: finished, freed, and r3 takes its place.
    assert [(t.request_id, t.index, t.token_ids, t.finish_reason) for t in emitted(out)] == [
        ("r1", 1, (7,), "length"), ("r2", 1, (8,), "")]
    assert frees(out) == ["r1"] and loads(out) == ["r3"] and c.queued == 0
    assert c.count(SeqState.RUNNING) + c.count(SeqState.LOADING) == 2


def test_kv_block_backpressure_then_admission_when_freed() -> None:
    # Each request needs ceil((4 + 8) / 4) = 3 blocks; 5 blocks hold one at a time.
    c = core(kv_blocks=5, max_batch=8)
    assert blocks_for(4, 8, 4) == 3
    eff = c.admit(req("r1", max_tokens=8)) + c.admit(req("r2", max_tokens=8))
    assert loads(eff) == ["r1"] and c.free_blocks == 2 and c.queued == 1
    load_all(c, eff)
    assert c.load()["free_kv_blocks"] == 2 and c.load()["queued"] == 1
    out = run_step(c, lambda rid: STOP)
    assert emitted(out)[0].finish_reason == "stop"
    assert loads(out) == ["r2"] and c.free_blocks == 2


def test_fifo_head_of_line_waits_even_if_a_later_one_fits() -> None:
    c = core(kv_blocks=6, max_batch=8)
    eff = c.admit(req("big1", max_tokens=16))          # 5 blocks
    eff += c.admit(req("big2", max_tokens=16))         # 5 blocks: waits
    eff += c.admit(req("small", max_tokens=2))         # 2 blocks would fit, but FIFO
    assert loads(eff) == ["big1"] and c.queued == 2
    load_all(c, eff)
    out = c.cancel("big1")
    assert loads(out) == ["big2"]                       # then small still waits for blocks
    assert c.queued == 1 and c.state_of("small") is SeqState.QUEUED


def test_positions_and_indices_follow_the_reference_rule() -> None:
    c = core()
    eff = c.admit(req("r", prompt_len=6, max_tokens=4, generated=2, next_token=9))
    load_all(c, eff)
    assert eff[0].load.capacity == 6 + 4
    plan = c.plan_step()
    run = plan.runs[0][1]
    assert run.tokens == (9,) and run.positions == (6 + 2 - 1,)
    out = c.complete_step(plan.step, {"a0": onehot([11])})
    assert emitted(out)[0].index == 2
    plan = c.plan_step()
    assert plan.runs[0][1].tokens == (11,) and plan.runs[0][1].positions == (8,)
    out = c.complete_step(plan.step, {"a0": onehot([12])})
    t = emitted(out)[0]
    assert (t.index, t.token_ids, t.finish_reason) == (3, (12,), "length")
    assert c.free_blocks == 64 and c.plan_step() is None


def test_stop_token_finishes_and_frees() -> None:
    c = core()
    load_all(c, c.admit(req("r", max_tokens=10)))
    out = run_step(c, lambda rid: STOP)
    assert [(t.token_ids, t.finish_reason) for t in emitted(out)] == [((STOP,), "stop")]
    assert frees(out) == ["r"] and c.state_of("r") is None and c.stats.finished == 1


def test_cancel_frees_blocks_in_every_state() -> None:
    c = core(kv_blocks=9, max_batch=2)
    eff = c.admit(req("run", max_tokens=8)) + c.admit(req("load", max_tokens=8)) + c.admit(req("q", max_tokens=8))
    assert c.free_blocks == 3
    c.loaded("run", "a0")
    # queued: no blocks held, no Free.
    out = c.cancel("q")
    assert frees(out) == [] and c.free_blocks == 3 and c.queued == 0
    assert emitted(out) == [], "the router asked: its Ok is the answer, no push"
    # loading: blocks back and Free sent (the rank may already hold it); the rank answers in
    # order, so that Free follows the Load and the late Loaded is ignored (no second Free, which
    # could hit a later sequence of the same id).
    out = c.cancel("load")
    assert frees(out) == ["load"] and c.free_blocks == 6
    assert c.loaded("load", "a0") == []
    # running with its step in flight: blocks and Free wait for the step to complete.
    plan = c.plan_step()
    out = c.cancel("run")
    assert out == [] and c.free_blocks == 6
    out = c.complete_step(plan.step, {"a0": onehot([3])})
    assert emitted(out) == [], "a cancelled sequence's row is not streamed"
    assert frees(out) == ["run"] and c.free_blocks == 9 and c.stats.cancelled == 3


def test_evict_all_pushes_cancelled_so_routers_replay() -> None:
    c = core(max_batch=1)
    eff = c.admit(req("a", router="router-0")) + c.admit(req("b", router="router-1"))
    load_all(c, eff)
    out = c.evict_all()
    assert sorted((e.router, e.tokens.request_id, e.tokens.index, e.tokens.finish_reason)
                  for e in out if isinstance(e, Emit)) == [("router-0", "a", 1, "cancelled"),
                                                           ("router-1", "b", 1, "cancelled")]
    assert frees(out) == ["a"] and c.free_blocks == 64 and c.queued == 0 and c.plan_step() is None


def test_refusals_carry_codes() -> None:
    c = core(max_queue=1, max_batch=1, kv_blocks=8)
    c.admit(req("r1"))
    c.admit(req("r2"))                       # queued (batch full)
    with pytest.raises(Refused) as e:
        c.admit(req("r3"))
    assert e.value.code == "RESOURCE_EXHAUSTED" and "queue full" in e.value.message
    assert c.admit(req("r2")) == [], "a retried Admit is idempotent"
    with pytest.raises(Refused) as e:
        core(kv_blocks=2).admit(req("huge", max_tokens=40))
    assert e.value.code == "RESOURCE_EXHAUSTED" and "needs 11 KV blocks" in e.value.message
    bad = [req("x", generated=0), req("x", next_token=STOP), req("x", max_tokens=1),
           req("x", prompt_len=500, max_tokens=20), req("", max_tokens=4), req("x", prompt_len=0)]
    bad.append(Request("x", 4, SamplingParams(), KVRef(7, 4, ()), 5, 1, "r"))
    for r in bad:
        with pytest.raises(Refused) as e:
            core().admit(r)
        assert e.value.code == "INVALID_ARGUMENT", r
    with pytest.raises(Refused) as e:
        c.cancel("nope")
    assert e.value.code == "NOT_FOUND"
    assert c.stats.refused == 1 + 0 and c.stats.admitted == 2


def test_every_illegal_transition_names_request_state_and_event() -> None:
    for state, event in itertools.product(SeqState, SeqEvent):
        if (state, event) in TRANSITIONS:
            assert next_state("r9", state, event) in SeqState
            continue
        with pytest.raises(IllegalTransition) as e:
            next_state("r9", state, event)
        msg = str(e.value)
        assert "r9" in msg and state.value in msg and event.value in msg
    for terminal in (SeqState.FINISHED, SeqState.CANCELLED, SeqState.FAILED):
        assert not any(s is terminal for s, _ in TRANSITIONS), "terminal states have no way out"


def test_least_loaded_rank_and_rank_failure() -> None:
    c = core(ranks=("a0", "a1"), max_batch=8)
    eff = []
    for i in range(3):
        eff += c.admit(req(f"r{i}"))
    assert [e.rank for e in eff] == ["a0", "a1", "a0"]
    load_all(c, eff)
    plan = c.plan_step()
    assert {rank: run.request_ids for rank, run in plan.runs} == {"a0": ("r0", "r2"), "a1": ("r1",)}
    out = c.complete_step(plan.step, {"a0": onehot([1, 2]), "a1": "attention rank a1 did not answer step 1 in 2 s"})
    errs = [t for t in emitted(out) if t.finish_reason == "error"]
    assert [(t.request_id, t.index, t.token_ids) for t in errs] == [("r1", 1, ())]
    assert errs[0].code is Code.UNAVAILABLE and errs[0].error.startswith("attention rank a1 did not answer")
    assert frees(out) == ["r1"], "freed on the rank all the same: it may only have been slow"
    assert c.load()["live_ranks"] == 1
    assert {e.rank for e in c.admit(req("r9"))} == {"a0"}
    # A wrong-shaped answer is a peer fault, too; with no live rank left, admission is refused.
    plan = c.plan_step()
    out = c.complete_step(plan.step, {"a0": np.zeros((1, VOCAB), np.float32)})
    assert {t.finish_reason for t in emitted(out)} == {"error"} and c.free_blocks == 0 == c.total_blocks
    with pytest.raises(Refused) as e:
        c.admit(req("late"))
    assert e.value.code == "UNAVAILABLE"
    assert loads(c.rank_up("a1")) == [] and c.free_blocks == 32
    assert loads(c.admit(req("late"))) == ["late"]


def test_load_error_and_timeout_fail_only_that_request() -> None:
    c = core(kv_blocks=8)
    eff = c.admit(req("a")) + c.admit(req("b"))
    out = c.loaded("a", "a0", error="KV pool miss for block 0")
    assert emitted(out)[0].finish_reason == "error" and "KV pool miss" in emitted(out)[0].error
    assert emitted(out)[0].code is Code.UNAVAILABLE
    out = c.load_failed("b", "attention rank a0 did not answer Load in 5 s")
    assert frees(out) == ["b"] and emitted(out)[0].finish_reason == "error"
    assert c.free_blocks == 8 and c.load()["live_ranks"] == 1
    assert c.load_failed("b", "again") == [] and c.stats.failed == 2


def test_complete_step_checks_the_step_number() -> None:
    c = core()
    load_all(c, c.admit(req("r")))
    plan = c.plan_step()
    assert c.plan_step() is None, "one step in flight at a time"
    with pytest.raises(ValueError):
        c.complete_step(plan.step + 1, {})


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["admit", "cancel", "step", "load", "takeover"]),
                              st.integers(0, 9), st.integers(2, 12), st.integers(0, VOCAB - 1)),
                    max_size=60))
def test_random_schedules_keep_accounting_and_end_every_request_once(ops) -> None:
    c = core(kv_blocks=10, max_batch=3, max_queue=4, ranks=("a0", "a1"))
    finals: dict[str, int] = {}
    admitted: set[str] = set()
    pending_loads: list[SendLoad] = []

    def absorb(effects) -> None:
        for e in effects:
            if isinstance(e, SendLoad):
                pending_loads.append(e)
            elif isinstance(e, Emit) and e.tokens.finish_reason:
                finals[e.tokens.request_id] = finals.get(e.tokens.request_id, 0) + 1

    for op, i, n, tok in ops:
        rid = f"r{i}-{len(admitted)}" if op == "admit" else f"r{i}"
        if op == "admit":
            try:
                absorb(c.admit(req(rid, max_tokens=n)))
                admitted.add(rid)
            except Refused as e:
                assert e.code == "RESOURCE_EXHAUSTED"
        elif op == "cancel" and admitted:
            target = sorted(admitted)[i % len(admitted)]
            if c.state_of(target) is not None:
                state = c.state_of(target)
                with pytest.raises(Refused):          # a router that never held it (or lost it)
                    c.cancel(target, "router-stale")
                assert c.state_of(target) is state
                absorb(c.cancel(target))
                finals[target] = finals.get(target, 0) + 1   # the Cancel's Ok is its end
        elif op == "takeover" and admitted:
            target = sorted(admitted)[i % len(admitted)]
            if c.state_of(target) is not None:   # live: another router resumes it
                try:
                    absorb(c.admit(req(target, max_tokens=n, router=f"router-{tok}")))
                except Refused as e:
                    assert e.code == "RESOURCE_EXHAUSTED"
        elif op == "load" and pending_loads:
            e = pending_loads.pop(0)
            absorb(c.loaded(e.load.request_id, e.rank))
        elif op == "step":
            plan = c.plan_step()
            if plan:
                absorb(c.complete_step(plan.step, {r: onehot([tok] * len(run.request_ids)) for r, run in plan.runs}))
        assert 0 <= c.free_blocks <= 10
        assert c.count(SeqState.RUNNING) + c.count(SeqState.LOADING) <= 3
        assert c.queued <= 4
    # Drain: load everything, step until nothing runs.
    while pending_loads or c.has_running or c.queued:
        while pending_loads:
            e = pending_loads.pop(0)
            absorb(c.loaded(e.load.request_id, e.rank))
        plan = c.plan_step()
        if plan:
            absorb(c.complete_step(plan.step, {r: onehot([0] * len(run.request_ids)) for r, run in plan.runs}))
    assert c.free_blocks == 10
    assert set(finals) == admitted and set(finals.values()) <= {1}, "every request ends exactly once"


def test_rank_failed_mid_step_ends_loading_and_running_sequences() -> None:
    c = core(ranks=("a0", "a1"), max_batch=8)
    eff = c.admit(req("run0")) + c.admit(req("run1")) + c.admit(req("load0"))   # a0, a1, a0
    c.loaded("run0", "a0")
    c.loaded("run1", "a1")
    plan = c.plan_step()
    out = c.rank_failed("a0", "attention rank a0 did not answer Load of load0 within 7 s")
    errs = {t.request_id: t.code for t in emitted(out)}
    assert errs == {"run0": Code.UNAVAILABLE, "load0": Code.UNAVAILABLE}
    assert frees(out) == ["load0"], "run0 is in the step in flight: freed when it completes"
    # a0's answer to the in-flight step comes anyway: nothing for the ended sequences.
    out = c.complete_step(plan.step, {"a0": onehot([1]), "a1": onehot([2])})
    assert [(t.request_id, t.token_ids) for t in emitted(out)] == [("run1", (2,))]
    assert frees(out) == ["run0"] and c.is_down("a0")
    assert c.free_blocks == 32 - 2 and c.load()["live_ranks"] == 1
    assert {e.rank for e in c.admit(req("next"))} == {"a1"}
    with pytest.raises(ValueError):
        c.rank_failed("a7", "no such rank")


def test_kv_budget_is_per_rank() -> None:
    # 8 blocks over two ranks: 4 each, as the attention ranks budget their caches.
    c = core(kv_blocks=8, ranks=("a0", "a1"), max_batch=8)
    eff = c.admit(req("x", max_tokens=8)) + c.admit(req("y", max_tokens=8))     # 3 blocks each
    assert [(e.rank, e.load.request_id) for e in eff] == [("a0", "x"), ("a1", "y")]
    assert loads(c.admit(req("z", max_tokens=4))) == [], "2 blocks free in the group, but 1 per rank"
    assert c.free_blocks == 2 and c.queued == 1
    assert [(e.rank, e.load.request_id) for e in c.cancel("y") if isinstance(e, SendLoad)] == [("a1", "z")]
    with pytest.raises(Refused) as e:
        c.admit(req("w", max_tokens=16))                                          # 5 blocks > 4 per rank
    assert e.value.code == "RESOURCE_EXHAUSTED" and "an attention rank of this group has 4" in e.value.message


def test_a_refused_step_fails_its_sequences_but_not_the_rank() -> None:
    c = core(ranks=("a0", "a1"), max_batch=8)
    load_all(c, c.admit(req("x")) + c.admit(req("y")))          # x on a0, y on a1
    plan = c.plan_step()
    out = c.complete_step(plan.step, {"a0": StepRefused("StepError: unknown sequence x"), "a1": onehot([4])})
    fails = [t for t in emitted(out) if t.finish_reason == "error"]
    assert [(t.request_id, t.code, t.error) for t in fails] == [
        ("x", Code.UNAVAILABLE, "attention rank a0 refused step 1: StepError: unknown sequence x")]
    assert frees(out) == ["x"] and not c.is_down("a0") and c.load()["live_ranks"] == 2
    assert [e.rank for e in c.admit(req("z"))] == ["a0"]


# -- takeover: an Admit for a held request id from another router / resume point --------------
def test_a_retried_admit_from_the_same_router_stays_idempotent_in_every_state() -> None:
    c = core(max_batch=1)
    eff = c.admit(req("a")) + c.admit(req("b"))
    assert c.admit(req("a")) == [] and c.admit(req("b")) == []       # loading, queued
    load_all(c, eff)
    assert c.admit(req("a")) == [] and c.stats.takeovers == 0 and c.stats.admitted == 2


def test_takeover_of_a_running_sequence_serves_the_new_router_from_its_resume_point() -> None:
    c = core()
    load_all(c, c.admit(req("r", prompt_len=4, max_tokens=8, router="router-0")))
    run_step(c, lambda rid: 7)
    run_step(c, lambda rid: 8)                        # router-0 (now dead) was sent indices 1, 2
    before = c.free_blocks
    new = req("r", prompt_len=4, max_tokens=8, generated=1, next_token=5, router="router-1")
    out = c.admit(new)
    assert emitted(out) == [], "nothing is pushed to the old router"
    assert frees(out) == ["r"] and loads(out) == ["r"], "Free of the old sequence, then Load of the new"
    assert [type(e).__name__ for e in out] == ["SendFree", "SendLoad"]
    assert next(e.load for e in out if isinstance(e, SendLoad)).kv == new.kv
    assert c.free_blocks == before and c.stats.takeovers == 1
    load_all(c, out)
    plan = c.plan_step()
    assert plan.runs[0][1].positions == (4,), "feeds next_token at prompt_len + generated - 1"
    out = c.complete_step(plan.step, {"a0": onehot([9])})
    assert [(e.router, e.tokens.index, e.tokens.token_ids) for e in out if isinstance(e, Emit)] == \
        [("router-1", 1, (9,))]
    assert c.admit(new) == [], "the new router's retried Admit is idempotent"


def test_takeover_during_the_old_sequences_step_waits_for_that_step() -> None:
    c = core()
    load_all(c, c.admit(req("r", max_tokens=8, router="router-0")))
    plan = c.plan_step()
    out = c.admit(req("r", max_tokens=8, router="router-1"))
    assert out == [] and c.state_of("r") is None, "the old step still computes on the rank's cache"
    assert c.admit(req("r", max_tokens=8, router="router-1")) == []   # retried while waiting
    out = c.complete_step(plan.step, {"a0": onehot([3])})
    assert emitted(out) == [], "the old sequence's row is sampled for nobody"
    assert [type(e).__name__ for e in out] == ["SendFree", "SendLoad"] and c.state_of("r") is SeqState.LOADING
    load_all(c, out)
    out = run_step(c, lambda rid: 4)
    assert [(e.router, e.tokens.index) for e in out if isinstance(e, Emit)] == [("router-1", 1)]
    assert c.free_blocks == 64 - blocks_for(4, 8, 4)


def test_takeover_of_a_loading_sequence_ignores_the_old_loaded() -> None:
    c = core()
    c.admit(req("r", router="router-0"))                               # Load out, not answered
    out = c.admit(req("r", router="router-1"))
    assert [type(e).__name__ for e in out] == ["SendFree", "SendLoad"]
    assert c.loaded("r", "a0") == [] and c.state_of("r") is SeqState.LOADING, "that answered the old Load"
    assert c.loaded("r", "a0") == [] and c.state_of("r") is SeqState.RUNNING


def test_takeover_of_a_queued_sequence_and_cancel_of_a_waiting_one() -> None:
    c = core(max_batch=1)
    load_all(c, c.admit(req("x")))
    c.admit(req("r", router="router-0"))
    out = c.admit(req("r", router="router-1", generated=2, next_token=6))
    assert out == [] and c.queued == 1 and c.stats.takeovers == 1
    # a takeover waiting for an in-flight step can be cancelled by its router
    c2 = core()
    load_all(c2, c2.admit(req("r", max_tokens=8)))
    plan = c2.plan_step()
    c2.admit(req("r", max_tokens=8, router="router-1"))
    assert c2.cancel("r") == []
    out = c2.complete_step(plan.step, {"a0": onehot([3])})
    assert frees(out) == ["r"] and loads(out) == [] and c2.free_blocks == 64
    with pytest.raises(Refused):
        c2.cancel("r")


def test_an_invalid_takeover_is_refused_and_leaves_the_old_sequence() -> None:
    c = core()
    load_all(c, c.admit(req("r", router="router-0")))
    with pytest.raises(Refused):
        c.admit(req("r", router="router-1", generated=0))
    assert c.state_of("r") is SeqState.RUNNING and c.stats.takeovers == 0


# -- re-admission of an id whose sequence here ended; stale Cancels of a router that lost it ------
def finish(c: DecodeCore, rid: str, tok: int = 7) -> list:
    """Step until ``rid`` ends; every effect."""
    out: list = []
    while c.state_of(rid) is SeqState.RUNNING:
        out += run_step(c, lambda _: tok)
    return out


def test_a_finished_id_readmitted_by_another_router_runs_despite_the_old_routers_cancel() -> None:
    # The chaos case router-stop: router-0 hangs, its sequence finishes here (its tokens lost),
    # the client resumes on router-1, which re-admits the id; router-0 wakes up and answers the
    # old sequence's late pushes with Cancels. They must not end router-1's sequence.
    c = core()
    load_all(c, c.admit(req("r", max_tokens=3, router="router-0")))
    out = finish(c, "r")
    assert [t.finish_reason for t in emitted(out)][-1] == "length" and frees(out) == ["r"]
    eff = c.admit(req("r", max_tokens=3, generated=2, next_token=7, router="router-1"))
    assert loads(eff) == ["r"] and c.stats.takeovers == 0
    with pytest.raises(Refused) as exc:
        c.cancel("r", "router-0")                                  # a stray's Cancel
    assert exc.value.code == Code.NOT_FOUND and "router-1" in exc.value.message
    assert c.state_of("r") is SeqState.LOADING
    load_all(c, eff)
    with pytest.raises(Refused):
        c.cancel("r", "router-0")
    out = finish(c, "r", tok=9)
    assert [(e.router, e.tokens.index, e.tokens.token_ids, e.tokens.finish_reason)
            for e in out if isinstance(e, Emit)] == [("router-1", 2, (9,), "length")]
    assert frees(out) == ["r"] and c.free_blocks == 64
    # The owner's own Cancel (and an anonymous one) still works.
    load_all(c, c.admit(req("r", max_tokens=3, generated=2, next_token=7, router="router-0")))
    assert frees(c.cancel("r", "router-0")) == ["r"]
    load_all(c, c.admit(req("s", router="router-1")))
    assert frees(c.cancel("s")) == ["s"] and c.free_blocks == 64


def test_a_waiting_takeover_survives_the_old_routers_cancel() -> None:
    c = core()
    load_all(c, c.admit(req("r", max_tokens=8, router="router-0")))
    plan = c.plan_step()
    assert c.admit(req("r", max_tokens=8, router="router-1")) == []   # waits for the old step
    with pytest.raises(Refused):
        c.cancel("r", "router-0")
    out = c.complete_step(plan.step, {"a0": onehot([3])})
    assert [type(e).__name__ for e in out] == ["SendFree", "SendLoad"] and c.state_of("r") is SeqState.LOADING
    load_all(c, out)
    out = run_step(c, lambda _: 4)
    assert [(e.router, e.tokens.index) for e in out if isinstance(e, Emit)] == [("router-1", 1)]
    assert c.cancel("r", "router-1") and c.state_of("r") is None and c.free_blocks == 64


@pytest.mark.parametrize("end", ["cancel", "load_failed", "takeover"])
def test_an_id_that_ended_while_its_load_was_in_flight_readmits_and_completes(end: str) -> None:
    c = core()
    first = c.admit(req("r", max_tokens=3, router="router-0"))
    assert loads(first) == ["r"]                                    # Load out, not answered
    if end == "cancel":
        assert frees(c.cancel("r", "router-0")) == ["r"]
    elif end == "load_failed":                                       # the Load never went out
        assert emitted(c.load_failed("r", "outbox full"))[0].finish_reason == "error"
    second = c.admit(req("r", max_tokens=3, generated=2, next_token=7, router="router-1"))
    if end == "takeover":
        assert [type(e).__name__ for e in second] == ["SendFree", "SendLoad"]
    else:
        assert loads(second) == ["r"]
    if end != "load_failed":   # the rank answers the first Load (then frees it), then the second
        assert c.loaded("r", "a0") == [] and c.state_of("r") is SeqState.LOADING
    assert c.loaded("r", "a0") == [] and c.state_of("r") is SeqState.RUNNING
    out = finish(c, "r", tok=9)
    assert [(e.router, e.tokens.index, e.tokens.finish_reason) for e in out if isinstance(e, Emit)] == \
        [("router-1", 2, "length")]
    assert c.free_blocks == 64 and c.state_of("r") is None
