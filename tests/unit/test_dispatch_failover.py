"""Expert failover, pure: a layer's attempts (re-plan of a failed rank's rows onto replicas,
attempt ids, stale answers dropped) and the per-rank health lifecycle. No sockets: experts are
simulated with ``pack_rows`` -> ``run_block``; the oracle is ``reference_moe``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_dispatch_core import make_experts, make_gates
from xccl_net.dispatch_core import (
    AttemptsExhausted,
    DispatchLayout,
    LayerAttempts,
    NoLiveReplica,
    Placement,
    Verdict,
    e2a_meta,
    pack_event_id,
    pack_rows,
    plan_dispatch,
    reference_moe,
    run_block,
    unpack_event_id,
)
from xccl_net.dispatch_health import RankHealth, RankState
from xccl_net.errors import CorruptMetadata, ProtocolError

E, N, K, H, T = 8, 4, 2, 16, 12
PLACEMENT = Placement.round_robin(E, N, 2)      # expert e on ranks e % 4 and (e + 1) % 4
LAYOUT = DispatchLayout(num_sources=2, num_ranks=N, capacity_rows=T * K, hidden=H)
FN = make_experts(E, H)
INC = 77


def gates(seed: int = 0, tokens: int = T):
    return make_gates(np.random.default_rng(seed), tokens, K, E, H)


def answer(att: LayerAttempts, x: np.ndarray, rank: int) -> Verdict:
    """Rank ``rank`` serves its block of the current attempt (what an expert rank computes)."""
    plan = att.plan
    y = run_block(pack_rows(x, plan, rank), plan.experts[rank], FN, H)
    meta = e2a_meta(plan.event_id, rank, y.shape[0], LAYOUT, INC)
    verdict = att.accept(meta, y.nbytes)
    if verdict is Verdict.ANSWER:
        att.fill(rank, y)
    return verdict


def test_one_attempt_equals_the_reference_bitwise():
    x, ids, w = gates(1)
    att = LayerAttempts(pack_event_id(1, 5), 0, ids, PLACEMENT, LAYOUT, INC)
    plan = att.next_plan(())
    assert plan.ranks == (0, 1, 2, 3) and unpack_event_id(plan.event_id) == (1, 5, 0)
    for r in plan.ranks:
        assert answer(att, x, r) is Verdict.ANSWER
    assert att.done and att.waiting() == []
    np.testing.assert_array_equal(att.result(w), reference_moe([x], [ids], [w], FN)[0])


def test_a_failed_ranks_rows_go_to_its_replicas_in_a_new_attempt():
    x, ids, w = gates(2)
    att = LayerAttempts(pack_event_id(2, 9), 0, ids, PLACEMENT, LAYOUT, INC)
    first = att.next_plan(())
    lost = first.rows[1].copy()
    assert lost.size, "the test needs rows on rank 1"
    for r in (0, 2, 3):
        answer(att, x, r)
    with pytest.raises(RuntimeError, match="still waits"):
        att.next_plan({1})                      # a2e blocks are single-buffered: finish first
    att.rank_failed(1, "no answer")
    assert not att.done and att.waiting() == []
    np.testing.assert_array_equal(att.missing_rows(), np.sort(lost))
    retry = att.next_plan({1})
    assert unpack_event_id(retry.event_id) == (2, 9, 1)
    # Rank 1 holds experts 0 (replica) and 1, 5 (primary); 1 and 5 move to rank 2, expert 0 is
    # served by rank 0 already; only ranks that get rows are posted to.
    assert 1 not in retry.ranks and all(retry.count(r) > 0 for r in retry.ranks)
    assert sum(retry.count(r) for r in retry.ranks) == lost.size
    for r in retry.ranks:
        assert set(retry.experts[r].tolist()) <= PLACEMENT.hosted(r)
        answer(att, x, r)
    assert att.done
    np.testing.assert_array_equal(att.result(w), reference_moe([x], [ids], [w], FN)[0])


def test_late_answers_of_an_abandoned_attempt_or_a_given_up_rank_are_stale():
    x, ids, w = gates(3)
    att = LayerAttempts(pack_event_id(1, 0), 1, ids, PLACEMENT, LAYOUT, INC)
    first = att.next_plan(())
    for r in (0, 1, 3):
        answer(att, x, r)
    att.rank_failed(2, "put failed")
    late_same_attempt = e2a_meta(first.event_id, 2, first.count(2), LAYOUT, INC)
    assert att.accept(late_same_attempt) is Verdict.STALE   # given up on: its rows go elsewhere
    att.next_plan({2})
    assert att.accept(late_same_attempt) is Verdict.STALE   # an older event now
    other_incarnation = e2a_meta(att.event_id, 3, att.plan.count(3), LAYOUT, INC + 1)
    assert att.accept(other_incarnation) is Verdict.STALE
    for r in att.plan.ranks:
        answer(att, x, r)
    np.testing.assert_array_equal(att.result(w), reference_moe([x], [ids], [w], FN)[0])


def test_a_refusal_fails_the_rank_for_the_attempt_and_violations_are_typed():
    x, ids, w = gates(4)
    att = LayerAttempts(pack_event_id(1, 1), 0, ids, PLACEMENT, LAYOUT, INC)
    plan = att.next_plan(())
    refusal = e2a_meta(plan.event_id, 3, 0, LAYOUT, INC, error="CorruptMetadata: not hosted")
    assert att.accept(refusal) is Verdict.REFUSED
    assert att.failed == {3: f"refused event {plan.event_id}: CorruptMetadata: not hosted"}
    assert att.accept(refusal) is Verdict.STALE              # given up on already
    with pytest.raises(CorruptMetadata, match="returned"):
        att.accept(e2a_meta(plan.event_id, 0, plan.count(0) + 1, LAYOUT, INC))
    answer(att, x, 0)
    with pytest.raises(ProtocolError, match="twice"):
        att.accept(e2a_meta(plan.event_id, 0, plan.count(0), LAYOUT, INC))
    with pytest.raises(ProtocolError, match="not sent or already answered"):
        att.accept(e2a_meta(plan.event_id, 0, 0, LAYOUT, INC, error="late refusal"))


def test_no_live_replica_names_the_expert_and_changes_nothing():
    x, ids, w = gates(5)
    att = LayerAttempts(pack_event_id(1, 2), 0, ids, PLACEMENT, LAYOUT, INC)
    needed = sorted(set(ids.reshape(-1).tolist()))
    e = needed[0]
    holders = PLACEMENT.holders[e]
    with pytest.raises(NoLiveReplica) as info:
        att.next_plan(set(holders))
    assert info.value.expert_id in needed and att.attempt == -1 and att.plan is None
    # An expert nobody routes to never blocks a layer.
    unused = [q for q in range(E) if q not in needed]
    if unused:
        plan_dispatch(1, 0, ids, PLACEMENT, LAYOUT, excluded=set(PLACEMENT.holders[unused[0]]) - {
            r for q in needed for r in PLACEMENT.holders[q][:1]})
    assert att.next_plan(()).event_id == pack_event_id(1, 2)


def test_attempt_ids_are_bounded_by_the_event_id_field():
    x, ids, w = gates(6)
    att = LayerAttempts(pack_event_id(1, 3, attempt=254), 0, ids, PLACEMENT, LAYOUT, INC)
    att.next_plan(())
    att.rank_failed(0, "x")
    for r in (1, 2, 3):
        answer(att, x, r)
    att.next_plan({0})
    for r in att.plan.ranks:
        att.rank_failed(r, "again")
    with pytest.raises(AttemptsExhausted):
        att.next_plan({0, 1})


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(0, T), fail_rounds=st.lists(
    st.sets(st.integers(0, N - 1), max_size=2), max_size=3))
def test_any_sequence_of_failures_that_leaves_a_replica_gives_the_reference_bitwise(seed, tokens, fail_rounds):
    """Ranks fail over attempts (each round: some ranks of the current attempt fail, the rest
    answer); as long as a holder of every expert stays live, the result is bitwise exact."""
    x, ids, w = gates(seed, tokens)
    att = LayerAttempts(pack_event_id(1, 4), 0, ids, PLACEMENT, LAYOUT, INC)
    out: set[int] = set()
    rounds = list(fail_rounds)
    while True:
        try:
            plan = att.next_plan(out)
        except NoLiveReplica:
            return   # both holders of a needed expert out: the server waits or fails (not here)
        failing = rounds.pop(0) if rounds else set()
        for r in plan.ranks:
            if r in failing:
                att.rank_failed(r, "injected")
                out.add(r)
            else:
                answer(att, x, r)
        if att.done:
            break
    np.testing.assert_array_equal(att.result(w), reference_moe([x], [ids], [w], FN)[0])


# ---------------------------------------------------------------- rank health


def test_a_failed_rank_comes_back_only_on_a_beat_published_after_the_failure():
    h = RankHealth(4)
    h.beat(1, "ep1", 10)
    change = h.failed(1, "no answer")
    assert change is not None and change.new is RankState.OUT and h.excluded == {1}
    assert h.beat(1, "ep1", 10) is None and h.excluded == {1}     # duplicate: proves nothing
    change = h.beat(1, "ep1", 11)                                 # continued (SIGCONT) or only slow
    assert change is not None and change.new is RankState.IN and h.excluded == frozenset()


def test_silence_takes_a_rank_out_and_a_restart_brings_it_back():
    h = RankHealth(4)
    h.beat(2, "old", 3)
    h.silent(2, "no heartbeat for 3 s")
    assert h.state(2) is RankState.OUT and h.why(2) == "no heartbeat for 3 s"
    assert h.failed(2, "put failed") is None                      # already out
    change = h.beat(2, "new", 1)                                  # a restart: new epoch, small seq
    assert change is not None and "new epoch" in change.why and h.state(2) is RankState.IN
    assert h.failures(2) == 1


def test_a_rank_never_heard_from_comes_back_on_its_first_beat():
    h = RankHealth(2)
    h.failed(0, "PeerUnreachable")
    assert h.beat(0, "e", 1) is not None and h.excluded == frozenset()


def test_operator_exclusion_is_sticky_until_include():
    h = RankHealth(3)
    h.exclude(1)
    assert h.beat(1, "e", 5) is None and h.excluded == {1}
    h.include(1)
    assert h.excluded == frozenset()
    with pytest.raises(ValueError):
        h.failed(3, "no such rank")
