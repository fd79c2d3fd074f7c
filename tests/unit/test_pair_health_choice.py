"""Pairwise reachability (a rank CUT for one source by the fabric) and latency/load-aware replica
choice, pure: no sockets. The oracle for exactness is ``reference_moe``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_dispatch_failover import FN, INC, LAYOUT, PLACEMENT, answer, gates
from xccl_net.dispatch_core import LayerAttempts, NoLiveReplica, pack_event_id, reference_moe
from xccl_net.dispatch_health import IllegalTransition, RankEvent, RankHealth, RankState, TRANSITIONS
from xccl_net.replica_choice import ChoiceConfig, ReplicaChooser


# ---------------------------------------------------------------- pair health
def test_a_cut_rank_ignores_beats_and_comes_back_on_a_probe_that_goes_through():
    h = RankHealth(4)
    h.beat(2, "e1", 1)
    change = h.unreachable(2, "LinkDown: npu1 and npu5 are on opposite sides of p1")
    assert change is not None and change.new is RankState.CUT
    assert h.excluded == {2} and h.cut == {2} and h.cuts(2) == 1 and "opposite" in h.why(2)
    assert h.beat(2, "e1", 2) is None and h.beat(2, "e2", 0) is None   # alive says nothing of the path
    assert h.failed(2, "late") is None and h.state(2) is RankState.CUT
    back = h.reachable(2)
    assert back is not None and back.new is RankState.IN and h.excluded == frozenset()
    assert h.reachable(2) is None                                       # idempotent when IN


def test_silence_while_cut_is_death_and_a_beat_then_a_refused_put_cuts_again():
    h = RankHealth(2)
    h.beat(0, "e1", 1)
    h.unreachable(0, "LinkDown")
    assert h.silent(0, "no heartbeat").new is RankState.OUT
    assert h.reachable(0) is None and h.state(0) is RankState.OUT        # a path is no proof of life
    assert h.beat(0, "e2", 0).new is RankState.IN
    assert h.unreachable(0, "LinkDown again").new is RankState.CUT and h.cuts(0) == 2


def test_the_table_is_total_over_states_and_events():
    for state in RankState:
        for event in RankEvent:
            assert (state, event) in TRANSITIONS, (state, event)
    with pytest.raises(IllegalTransition):
        raise IllegalTransition(0, RankState.CUT, RankEvent.BEAT)


# ---------------------------------------------------------------- replica choice
SPREAD = ChoiceConfig(pack=False)


def test_no_observation_keeps_the_primary_like_the_first_holder_rule():
    ch = ReplicaChooser(4, SPREAD)
    rows = {e: 3 for e in range(PLACEMENT.num_experts)}
    np.testing.assert_array_equal(ch.choose(PLACEMENT, (), rows), PLACEMENT.choose((), rows))
    assert ch.moved == 0


def test_a_straggler_loses_its_rows_noise_does_not_move_them():
    ch = ReplicaChooser(4, SPREAD)
    for r in range(4):
        ch.observe(r, 0.004)
    ch.observe(1, 0.007)                      # noise: 3 ms slower, inside the margin
    out = ch.choose(PLACEMENT, (), {0: 5, 1: 5})
    assert out[0] == 0 and out[1] == 1 and ch.moved == 0
    for _ in range(20):
        ch.observe(1, 0.024)                  # +20 ms per block
    out = ch.choose(PLACEMENT, (), {0: 5, 1: 5})
    assert out[1] == 2                        # expert 1 (holders 1, 2) leaves the straggler
    assert out[0] == 0                        # expert 0 (holders 0, 1) keeps its primary
    for _ in range(40):
        ch.observe(1, 0.004)                  # the straggler recovered: back to the primary
    assert ch.choose(PLACEMENT, (), {1: 5})[1] == 1
    ch.observe(1, 0.5)
    ch.forget(1)                              # came back (restart, healed path): no stale cost
    assert ch.choose(PLACEMENT, (), {1: 5})[1] == 1 and ch.latency_s(1) == pytest.approx(0.004)


def test_choice_is_deterministic_and_respects_exclusion():
    a, b = ReplicaChooser(4, SPREAD), ReplicaChooser(4, SPREAD)
    for ch in (a, b):
        for r, lat in enumerate((0.03, 0.004, 0.004, 0.03)):
            ch.observe(r, lat)
    rows = {e: e + 1 for e in range(8)}
    np.testing.assert_array_equal(a.choose(PLACEMENT, (), rows), b.choose(PLACEMENT, (), rows))
    out = a.choose(PLACEMENT, {1}, rows)
    assert 1 not in out.tolist()
    with pytest.raises(NoLiveReplica) as ei:
        a.choose(PLACEMENT, {1, 2}, {1: 1})
    assert ei.value.expert_id == 1


def test_load_spreads_rows_between_equally_fast_holders_when_one_fills_up():
    ch = ReplicaChooser(4, ChoiceConfig(margin_s=0.0, margin_frac=0.0, load_weight=4.0, pack=False))
    for r in range(4):
        ch.observe(r, 0.01)
    out = ch.choose(PLACEMENT, (), {0: 10, 4: 10})   # experts 0 and 4 both live on ranks 0 and 1
    assert sorted([out[0], out[4]]) == [0, 1]


def test_pack_serves_a_plan_from_the_fewest_ranks_and_spreads_sources():
    all_experts = {e: 1 for e in range(PLACEMENT.num_experts)}
    used = [set(ReplicaChooser(4, ChoiceConfig(pack=True), prefer=s).choose(PLACEMENT, (), all_experts).tolist())
            for s in range(2)]
    # Round robin with 2 replicas: ranks {0, 2} (or {1, 3}) hold every expert between them.
    assert all(len(u) == 2 for u in used) and used[0].isdisjoint(used[1]), used
    # Over successive plans every rank gets blocks (ties rotate with the plan count).
    ch = ReplicaChooser(4)
    seen = set()
    for _ in range(4):
        ch.explore()
        seen |= set(ch.choose(PLACEMENT, (), {1: 1, 5: 1}).tolist()) - {-1}
    assert seen == {1, 2}   # experts 1 and 5 live on ranks 1 and 2 only: both get them in turn
    one_token = {1: 1, 5: 1, 2: 1, 6: 1}          # holders {1,2} {1,2} {2,3} {2,3}: rank 2 holds all
    assert set(ReplicaChooser(4, ChoiceConfig(pack=True)).choose(PLACEMENT, (), one_token)[[1, 5, 2, 6]]) == {2}
    ch = ReplicaChooser(4, ChoiceConfig(pack=True))
    out = ch.choose(PLACEMENT, {2}, one_token)    # rank 2 out: experts go to their other holders
    assert 2 not in out.tolist() and out[1] == out[5] == 1 and out[2] == out[6] == 3
    assert ch.moved == 0   # packing and exclusion are not moves "by cost" (the straggler signal)
    for r in range(4):
        ch.observe(r, 0.004)
    for _ in range(20):
        ch.observe(2, 0.024)                      # a straggler: used only where nothing else holds
    out = ch.choose(PLACEMENT, (), one_token)
    assert 2 not in out[[1, 5, 2, 6]].tolist() and ch.moved == 4   # each passed over the slow rank
    with pytest.raises(NoLiveReplica) as ei:
        ch.choose(PLACEMENT, {1, 2}, one_token)
    assert ei.value.expert_id == 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), lat=st.lists(st.floats(0.0, 0.05), min_size=4, max_size=4),
       pack=st.booleans())
def test_any_choice_gives_the_reference_bitwise(seed, lat, pack):
    x, ids, w = gates(seed)
    ch = ReplicaChooser(4, ChoiceConfig(pack=pack), prefer=seed)
    for r, v in enumerate(lat):
        ch.observe(r, v)
    att = LayerAttempts(pack_event_id(2, seed), 0, ids, PLACEMENT, LAYOUT, INC, chooser=ch)
    plan = att.next_plan(())
    for r in plan.ranks:
        answer(att, x, r)
    np.testing.assert_array_equal(att.result(w), reference_moe([x], [ids], [w], FN)[0])
