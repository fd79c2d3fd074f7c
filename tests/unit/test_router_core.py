"""Router pure core: lifecycle table, idempotent ids, picking policy, token bookkeeping, replays."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.liveness import Liveness
from services.model.config import EOS_ID
from services.model.sampling import SamplingParams
from services.common.status import Code
from services.router.core import (TRANSITIONS, Event, IllegalTransition, InvalidRequestError, NoBackend, Restart,
                                  RouterConfig, RouterCore, SendCancel, State, Subscribe, TableFull, UnknownRequest,
                                  RouterError, Wake)

P = SamplingParams(max_tokens=8)
PROMPT = (256, 72, 105)


def core_with_backends(**cfg) -> RouterCore:
    c = RouterCore(RouterConfig(**cfg))
    c.observe_beat("prefill-0", "prefill", -1, "e0", "serving", {"running": 0}, 0.0)
    c.observe_beat("decode-0", "decode", 0, "e1", "serving", {"running": 0, "free_kv_blocks": 100}, 0.0)
    return c


def decoding(c: RouterCore, rid: str = "r1", params: SamplingParams = P, first: int = 10) -> None:
    c.open(rid, PROMPT, params, 0.0)
    c.attach(rid)
    c.begin_prefill(rid, c.pick_prefill(), 0.0)
    c.prefill_done(rid, first, 0.0)
    c.assign_decode(rid, c.pick_decode(rid), 0.0)


def test_every_state_event_pair_outside_the_table_is_illegal_and_named() -> None:
    c = core_with_backends()
    c.open("r1", PROMPT, P, 0.0)
    req = c.requests["r1"]
    for state in State:
        for event in Event:
            if (state, event) in TRANSITIONS:
                continue
            req.state = state
            with pytest.raises(IllegalTransition) as ei:
                c._fire(req, event, 0.0)
            assert "'r1'" in str(ei.value) and state.value in str(ei.value) and event.value in str(ei.value)
    assert all(TRANSITIONS.get((s, e)) is None for s in (State.FINISHED, State.CANCELLED, State.FAILED) for e in Event)


def test_happy_path_first_token_streamed_then_pushes_in_order_until_stop() -> None:
    c = core_with_backends()
    decoding(c)
    req = c.requests["r1"]
    assert req.state is State.DECODING and req.tokens == [10] and req.decode == "decode-0"
    assert c.on_tokens("r1", 1, (11, 12), "", "", "decode-0", 1.0) == [Wake("r1")]
    eff = c.on_tokens("r1", 3, (13, EOS_ID), "stop", "", "decode-0", 2.0)
    assert req.tokens == [10, 11, 12, 13, EOS_ID] and req.state is State.FINISHED and req.finish_reason == "stop"
    assert Wake("r1") in eff and not any(isinstance(e, SendCancel) for e in eff)


def test_first_token_can_finish_the_request() -> None:
    c = core_with_backends()
    c.open("a", PROMPT, SamplingParams(max_tokens=1), 0.0)
    c.begin_prefill("a", "prefill-0", 0.0)
    c.prefill_done("a", 42, 0.0)
    assert c.requests["a"].state is State.FINISHED and c.requests["a"].finish_reason == "length"
    c.open("b", PROMPT, P, 0.0)
    c.begin_prefill("b", "prefill-0", 0.0)
    c.prefill_done("b", EOS_ID, 0.0)
    assert c.requests["b"].finish_reason == "stop"


def test_duplicate_pushes_are_dropped_gaps_and_divergence_fail_the_request() -> None:
    c = core_with_backends()
    decoding(c)
    c.on_tokens("r1", 1, (11, 12), "", "", "decode-0", 1.0)
    assert c.on_tokens("r1", 1, (11, 12), "", "", "decode-0", 1.0) == []       # pure duplicate
    c.on_tokens("r1", 2, (12, 13), "", "", "decode-0", 1.0)                      # overlap: 13 is new
    assert c.requests["r1"].tokens == [10, 11, 12, 13]
    eff = c.on_tokens("r1", 6, (1,), "", "", "decode-0", 1.0)                   # gap
    assert SendCancel("decode-0", "r1") in eff
    req = c.requests["r1"]
    assert req.state is State.FAILED and "skipped output positions" in req.error and "expected 4" in req.error
    decoding(c, "r2")
    c.on_tokens("r2", 0, (99,), "", "", "decode-0", 1.0)                        # disagrees with position 0
    assert c.requests["r2"].state is State.FAILED and "differ" in c.requests["r2"].error
    decoding(c, "r3")
    c.on_tokens("r3", 1, (c.cfg.vocab_size,), "", "", "decode-0", 1.0)
    assert "outside the vocabulary" in c.requests["r3"].error


def test_router_enforces_max_tokens_and_stop_even_if_the_master_does_not() -> None:
    c = core_with_backends()
    decoding(c, params=SamplingParams(max_tokens=3))
    eff = c.on_tokens("r1", 1, (1, 2, 3, 4), "", "", "decode-0", 1.0)
    req = c.requests["r1"]
    assert req.tokens == [10, 1, 2] and req.finish_reason == "length"
    assert SendCancel("decode-0", "r1") in eff                                 # master would go on: stop it


def test_pushes_from_a_group_that_is_not_the_current_one_are_strays() -> None:
    c = core_with_backends()
    decoding(c)
    assert c.on_tokens("r1", 1, (5,), "", "", "decode-9", 1.0) == [SendCancel("decode-9", "r1")]
    assert c.on_tokens("ghost", 0, (5,), "", "", "decode-0", 1.0) == [SendCancel("decode-0", "ghost")]
    assert c.on_tokens("ghost", 0, (5,), "stop", "", "decode-0", 1.0) == []    # already done there
    assert c.stray_pushes == 3 and c.requests["r1"].tokens == [10]


def test_master_error_fails_with_the_code_it_names() -> None:
    c = core_with_backends()
    decoding(c)
    c.on_tokens("r1", 1, (), "error", "r1: bad sampling", "decode-0", 1.0, Code.INVALID_ARGUMENT)
    req = c.requests["r1"]
    assert req.state is State.FAILED and req.error_code is Code.INVALID_ARGUMENT
    assert req.error == "decode-0: r1: bad sampling"
    # An error pushed without a code is the peer's bug: INTERNAL, not replayed.
    c2 = core_with_backends()
    decoding(c2)
    c2.on_tokens("r1", 1, (), "error", "boom", "decode-0", 1.0)
    assert c2.requests["r1"].state is State.FAILED and c2.requests["r1"].error_code is Code.INTERNAL


def test_master_unavailable_push_is_replayed_not_forwarded_until_restarts_run_out() -> None:
    c = core_with_backends(max_restarts=2)
    decoding(c)
    req = c.requests["r1"]
    c.on_tokens("r1", 1, (11,), "", "", "decode-0", 1.0)
    eff = c.on_tokens("r1", 2, (), "error", "attention rank attention-0-0 is dead", "decode-0", 1.5,
                      Code.UNAVAILABLE)
    assert req.state is State.ADMITTED and req.tokens == [10, 11] and req.error_code is Code.OK
    assert any(isinstance(e, Restart) and "attention-0-0" in e.reason for e in eff)
    for _ in range(2):   # replayed twice more, failing the same way
        c.begin_prefill("r1", "prefill-0", 2.0)
        c.prefill_done("r1", 12, 2.0)
        c.assign_decode("r1", "decode-0", 2.0)
        c.on_tokens("r1", len(req.tokens), (), "error", "expert-3 has no live replica", "decode-0", 2.5,
                    Code.UNAVAILABLE)
    assert req.state is State.FAILED and req.error_code == "UNAVAILABLE" and "expert-3" in req.error


def test_idempotent_ids_attach_refuse_or_replace() -> None:
    c = core_with_backends(retain_finished_s=10.0)
    r, created = c.open("x", PROMPT, P, 0.0)
    assert created
    same, created = c.open("x", PROMPT, P, 0.5)
    assert same is r and not created                                         # live: attach
    with pytest.raises(InvalidRequestError, match="different prompt"):
        c.open("x", (256, 1), P, 0.5)
    c.begin_prefill("x", "prefill-0", 0.0)
    c.prefill_done("x", EOS_ID, 1.0)                                          # finished
    again, created = c.open("x", PROMPT, P, 2.0)
    assert again is r and not created                                         # finished: replay its tokens
    other, created = c.open("x", (256, 1), P, 2.0)                            # finished + different: new run
    assert created and other is not r
    c.fail("x", "UNAVAILABLE", "gone", 3.0)
    assert "x" not in c.requests                                              # no stream: freed at once
    c.open("y", PROMPT, P, 0.0)
    c.attach("y")
    c.fail("y", "UNAVAILABLE", "gone", 3.0)
    with pytest.raises(InvalidRequestError, match="still being streamed"):
        c.open("y", PROMPT, P, 3.0)
    c.detach("y", 3.0)
    assert c.open("y", PROMPT, P, 3.0)[1]                                     # failed: retried fresh


def test_finished_requests_are_retained_then_forgotten() -> None:
    c = core_with_backends(retain_finished_s=10.0)
    c.open("x", PROMPT, SamplingParams(max_tokens=1), 0.0)
    c.begin_prefill("x", "prefill-0", 0.0)
    c.prefill_done("x", 7, 1.0)
    c.tick(5.0)
    assert "x" in c.requests
    c.tick(11.0)
    assert "x" not in c.requests


def test_table_is_bounded_and_evicts_finished_before_refusing() -> None:
    c = core_with_backends(max_requests=2)
    c.open("a", PROMPT, SamplingParams(max_tokens=1), 0.0)
    c.begin_prefill("a", "prefill-0", 0.0)
    c.prefill_done("a", 7, 0.0)
    c.open("b", PROMPT, P, 0.0)
    c.open("c", PROMPT, P, 0.0)                                               # evicts finished "a"
    assert set(c.requests) == {"b", "c"}
    with pytest.raises(TableFull):
        c.open("d", PROMPT, P, 0.0)


def test_cancel_and_last_stream_leaving_cancel_the_request_at_its_master() -> None:
    c = core_with_backends()
    with pytest.raises(UnknownRequest, match="'nope'"):
        c.cancel("nope", 0.0)
    decoding(c)
    eff = c.cancel("r1", 1.0)
    assert SendCancel("decode-0", "r1") in eff and c.requests["r1"].finish_reason == "cancelled"
    assert c.cancel("r1", 1.0) == []                                          # already ended: no-op
    c.detach("r1", 1.0)
    assert "r1" not in c.requests                                             # freed with its last stream
    decoding(c, "r2")
    c.attach("r2")                                                            # two clients on one id
    assert c.detach("r2", 1.0) == [] and c.requests["r2"].state is State.DECODING
    eff = c.detach("r2", 1.0)                                                 # the last one left
    assert SendCancel("decode-0", "r2") in eff and "r2" not in c.requests


def test_prefill_pick_prefers_lowest_load_and_spreads_a_burst() -> None:
    c = RouterCore()
    c.observe_beat("prefill-0", "prefill", -1, "e", "serving", {"running": 3, "queued": 1}, 0.0)
    c.observe_beat("prefill-1", "prefill", -1, "e", "serving", {"running": 1}, 0.0)
    c.observe_beat("prefill-2", "prefill", -1, "e", "draining", {"running": 0}, 0.0)
    assert c.pick_prefill() == "prefill-1"
    for i in range(3):                                                        # beats lag: count our own sends
        c.open(f"r{i}", PROMPT, P, 0.0)
        c.begin_prefill(f"r{i}", c.pick_prefill(), 0.0)
    assert [c.requests[f"r{i}"].prefill for i in range(3)] == ["prefill-1", "prefill-1", "prefill-1"]
    c.open("r3", PROMPT, P, 0.0)
    assert c.pick_prefill() == "prefill-0"                                    # 4+0 vs 1+3: tie -> name
    c.liveness_changed("prefill-0", Liveness.SUSPECT, 1.0)
    assert c.pick_prefill() == "prefill-1"
    with pytest.raises(NoBackend, match=r"prefill-0: suspect.*prefill-1: tried.*prefill-2: draining"):
        c.pick_prefill(exclude=frozenset({"prefill-1"}))
    with pytest.raises(NoBackend, match="no decode service has been heard from"):
        c.pick_decode("r3")


def test_decode_pick_wants_room_then_most_free_kv_and_falls_back_to_least_queued() -> None:
    c = RouterCore(RouterConfig(max_batch=4, kv_block_size=16))
    c.open("r", PROMPT, SamplingParams(max_tokens=60), 0.0)                   # needs ceil(63/16) = 4 blocks
    c.observe_beat("decode-0", "decode", 0, "e", "serving", {"running": 1, "free_kv_blocks": 50}, 0.0)
    c.observe_beat("decode-1", "decode", 1, "e", "serving", {"running": 2, "free_kv_blocks": 80}, 0.0)
    c.observe_beat("decode-2", "decode", 2, "e", "serving", {"running": 4, "free_kv_blocks": 500}, 0.0)
    c.observe_beat("decode-3", "decode", 3, "e", "serving", {"running": 0, "free_kv_blocks": 3}, 0.0)
    assert c.pick_decode("r") == "decode-1"                                   # 2 is full, 3 has no room
    c.liveness_changed("decode-1", Liveness.DEAD, 1.0)
    assert c.pick_decode("r") == "decode-0"
    c.observe_beat("decode-0", "decode", 0, "e", "serving", {"running": 4, "free_kv_blocks": 50, "queued": 5}, 0.0)
    c.observe_beat("decode-2", "decode", 2, "e", "serving", {"running": 4, "free_kv_blocks": 500, "queued": 2}, 0.0)
    c.observe_beat("decode-3", "decode", 3, "e", "serving", {"running": 0, "free_kv_blocks": 3, "queued": 9}, 0.0)
    assert c.pick_decode("r") == "decode-2"                                   # all full: least queued


def test_decode_death_replays_prompt_plus_streamed_tokens_elsewhere() -> None:
    c = core_with_backends(max_restarts=1)
    c.observe_beat("decode-1", "decode", 1, "e", "serving", {"running": 0, "free_kv_blocks": 10}, 0.0)
    decoding(c)                                                               # decode-0: most free blocks
    c.on_tokens("r1", 1, (11, 12), "", "", "decode-0", 1.0)
    eff = c.liveness_changed("decode-0", Liveness.DEAD, 2.0)
    req = c.requests["r1"]
    assert Restart("r1", "decode-0 is dead") in eff
    assert not any(isinstance(e, SendCancel) for e in eff)                    # a dead master gets nothing
    assert req.state is State.ADMITTED and req.tokens == [10, 11, 12] and req.decode == ""
    c.begin_prefill("r1", c.pick_prefill(), 2.0)                              # the driver replays...
    c.prefill_done("r1", 13, 2.0)                                             # ...the next position
    c.assign_decode("r1", c.pick_decode("r1"), 2.0)
    assert req.decode == "decode-1" and req.tokens == [10, 11, 12, 13]
    c.on_tokens("r1", 4, (14,), "", "", "decode-1", 3.0)
    assert req.tokens == [10, 11, 12, 13, 14]
    c.liveness_changed("decode-1", Liveness.DEAD, 4.0)                        # over the restart limit
    assert req.state is State.FAILED and req.error_code == "UNAVAILABLE" and "gave up" in req.error


def test_restart_of_a_master_with_a_new_epoch_resubscribes_and_replays() -> None:
    c = core_with_backends()
    decoding(c)
    eff = c.observe_beat("decode-0", "decode", 0, "e-new", "serving", {"free_kv_blocks": 100}, 1.0)
    assert Subscribe("decode-0") in eff and Restart("r1", "decode-0 restarted") in eff
    assert SendCancel("decode-0", "r1") in eff                                # the new process may not hold it


def test_unasked_cancel_from_a_master_migrates_and_silence_times_out() -> None:
    c = core_with_backends(token_timeout_s=5.0)
    decoding(c)
    eff = c.on_tokens("r1", 1, (), "cancelled", "", "decode-0", 1.0)
    assert any(isinstance(e, Restart) for e in eff) and c.requests["r1"].state is State.ADMITTED
    decoding(c, "r2")
    assert c.tick(4.0) == []
    assert any(isinstance(e, Restart) and e.request_id == "r2" for e in c.tick(5.5))


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=30))
def test_tokens_never_skip_or_repeat_whatever_overlapping_pushes_arrive(chunks) -> None:
    """Pushes re-send arbitrary suffixes of the true sequence (retries, replays): the table
    always holds exactly a prefix of it."""
    truth = [(7 * i + 3) % 250 for i in range(64)]
    c = core_with_backends()
    decoding(c, params=SamplingParams(max_tokens=64, stop_token_ids=(EOS_ID,)), first=truth[0])
    for back, n in chunks:
        have = len(c.requests["r1"].tokens)
        start = max(1, have - back)
        c.on_tokens("r1", start, tuple(truth[start:start + n]), "", "", "decode-0", 1.0)
        got = c.requests["r1"].tokens
        assert got == truth[:len(got)] and len(got) >= have


# -- waiting for a backend ------------------------------------------------------------------
def test_no_live_prefill_waits_until_the_clients_deadline_then_names_it() -> None:
    c = core_with_backends(deadline_margin_s=0.25)
    c.open("r1", PROMPT, P, 0.0, deadline_s=10.0)
    c.liveness_changed("prefill-0", Liveness.DEAD, 1.0)
    with pytest.raises(NoBackend) as ei:
        c.pick_prefill()
    assert c.backend_wait("r1", ei.value.message, 1.0) == pytest.approx(8.75)
    assert c.backend_wait("r1", ei.value.message, 9.0) == pytest.approx(0.75)
    with pytest.raises(RouterError) as ei2:
        c.backend_wait("r1", ei.value.message, 9.8)
    assert ei2.value.code == "DEADLINE_EXCEEDED" and "prefill-0: dead" in ei2.value.message


def test_without_a_deadline_the_wait_is_bounded_by_backend_wait_s() -> None:
    c = core_with_backends(backend_wait_s=5.0)
    c.open("r1", PROMPT, P, 0.0)
    assert c.backend_wait("r1", "no live prefill service (prefill-0: dead)", 2.0) == pytest.approx(5.0)
    assert c.backend_wait("r1", "again", 6.0) == pytest.approx(1.0)
    with pytest.raises(NoBackend) as ei:
        c.backend_wait("r1", "no live prefill service (prefill-0: dead)", 7.0)
    assert ei.value.code == "UNAVAILABLE" and "prefill-0: dead" in ei.value.message
    # once it got a backend, a later wait starts afresh
    c.begin_prefill("r1", "prefill-0", 7.5)
    c.retry_prefill("r1", 8.0)
    assert c.backend_wait("r1", "busy", 8.0) == pytest.approx(5.0)


def test_a_stream_attaching_extends_the_deadline_and_none_means_unbounded() -> None:
    c = core_with_backends()
    c.open("r1", PROMPT, P, 0.0, deadline_s=5.0)
    c.open("r1", PROMPT, P, 1.0, deadline_s=9.0)
    assert c.requests["r1"].deadline_s == 9.0
    c.open("r1", PROMPT, P, 1.0, deadline_s=3.0)
    assert c.requests["r1"].deadline_s == 9.0
    c.open("r1", PROMPT, P, 1.0)
    assert c.requests["r1"].deadline_s is None


def test_a_hung_prefill_that_wakes_is_usable_again_and_dies_again_on_silence() -> None:
    c = core_with_backends(dead_after_s=1.5)
    c.open("r1", PROMPT, P, 0.0)
    c.begin_prefill("r1", c.pick_prefill(), 0.0)
    eff = c.liveness_changed("prefill-0", Liveness.DEAD, 2.0)            # SIGSTOPped
    assert any(isinstance(e, Restart) for e in eff) and c.requests["r1"].state is State.ADMITTED
    with pytest.raises(NoBackend):
        c.pick_prefill()
    c.observe_beat("prefill-0", "prefill", -1, "e0", "serving", {}, 5.0)  # SIGCONT: same epoch
    assert c.pick_prefill() == "prefill-0" and c.revived == 1
    c.begin_prefill("r1", "prefill-0", 5.0)
    assert c.tick(6.0) == []
    eff = c.tick(6.6)                                                   # silent again past dead_after_s
    assert any(isinstance(e, Restart) for e in eff)
    with pytest.raises(NoBackend):
        c.pick_prefill()
    # a restart (new epoch) is the detector's business again
    c.liveness_changed("prefill-0", Liveness.ALIVE, 7.0)
    c.observe_beat("prefill-0", "prefill", -1, "e9", "serving", {}, 7.0)
    assert c.pick_prefill() == "prefill-0" and not c.peers["prefill-0"].woke
    assert c.tick(20.0) == []


def test_a_hung_decode_master_stays_dead_and_its_late_pushes_are_cancelled() -> None:
    c = core_with_backends()
    c.observe_beat("decode-1", "decode", 1, "e2", "serving", {"running": 0, "free_kv_blocks": 50}, 0.0)
    decoding(c)
    assert c.requests["r1"].decode == "decode-0"
    eff = c.liveness_changed("decode-0", Liveness.DEAD, 2.0)
    assert not any(isinstance(e, SendCancel) for e in eff), "a dead master is not talked to"
    c.begin_prefill("r1", "prefill-0", 2.0)
    c.prefill_done("r1", 11, 2.0)                                          # the replay's token 1
    c.assign_decode("r1", c.pick_decode("r1"), 2.0)
    assert c.requests["r1"].decode == "decode-1"
    c.observe_beat("decode-0", "decode", 0, "e1", "serving", {"running": 1, "free_kv_blocks": 100}, 3.0)
    assert c.peers["decode-0"].liveness is Liveness.DEAD, "same epoch: still dead"
    # its late pushes (continued after SIGCONT) change nothing and are told to stop
    assert c.on_tokens("r1", 2, (99,), "", "", "decode-0", 3.1) == [SendCancel("decode-0", "r1")]
    assert c.requests["r1"].tokens == [10, 11]
    assert c.on_tokens("r1", 2, (12,), "", "", "decode-1", 3.2) == [Wake("r1")]
    assert c.requests["r1"].tokens == [10, 11, 12]
