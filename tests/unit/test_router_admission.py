"""Router admission: the bounded FCFS queue, room from beats, fair shares, deadlines, and
letting go of what backends hold for a request that ends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.common.status import Code
from services.protocol.inference import KVRef
from services.router import admission
from services.router.core import ReleaseStage, RouterConfig, RouterCore, SendCancel, State, TableFull
from services.model.sampling import SamplingParams

P = SamplingParams(max_tokens=8)
PROMPT = (256, 72, 105)
STAGED = KVRef(3, 16, (), source="prefill-0", stage_id=7)


def peer(role: str, last_beat_s: float = 0.0, usable: bool = True, **load: float) -> SimpleNamespace:
    return SimpleNamespace(role=role, load=load, last_beat_s=last_beat_s, usable=usable)


def pod(**cfg) -> RouterCore:
    """One prefill with 4 slots, one DP group of batch 2 (+1 slack) with 100 free KV blocks."""
    c = RouterCore(RouterConfig(max_batch=2, decode_slack=1, **cfg))
    c.observe_beat("prefill-0", "prefill", -1, "e0", "serving", {"running": 0, "capacity": 4}, 0.0)
    c.observe_beat("decode-0", "decode", 0, "e1", "serving",
                   {"running": 0, "queued": 0, "max_batch": 2, "free_kv_blocks": 100}, 0.0)
    return c


def test_admit_count_is_fcfs_and_stops_at_the_first_request_that_does_not_fit() -> None:
    r = admission.Rooms(prefill={"p": 10}, decode={"d": [5, 10]}, pending=0)
    assert admission.admit_count(r, [4, 4, 4, 1]) == 2          # the third needs 4 of 2 blocks left: stop, FCFS
    assert admission.admit_count(r, [1] * 9) == 5               # batch slots bound it
    r = admission.Rooms(prefill={"p": 2}, decode={"d": [5, 10]}, pending=0)
    assert admission.admit_count(r, [1] * 9) == 2               # prefill slots bound it
    r = admission.Rooms(prefill={"p": 10}, decode={"d": [5, 100]}, pending=3)
    assert admission.admit_count(r, [1] * 9) == 2               # 3 on their way hold slots already
    assert admission.admit_count(admission.Rooms({}, {"d": [5, 9]}, 0), [1]) == 0


def test_admit_count_takes_a_fair_share_when_other_routers_wait() -> None:
    r = admission.Rooms(prefill={"p": 100}, decode={"d": [9, 100]}, pending=0)
    assert admission.admit_count(r, [1] * 20) == 9
    assert admission.admit_count(r, [1] * 20, routers_waiting=1) == 5
    assert admission.admit_count(r, [1] * 20, routers_waiting=2) == 3


def test_rooms_subtract_what_was_sent_since_the_last_beat_only() -> None:
    peers = {"p": peer("prefill", 1.0, running=1, capacity=4),
             "d": peer("decode", 1.0, running=2, queued=0, max_batch=4, free_kv_blocks=50),
             "x": peer("decode", 1.0, usable=False, running=0)}
    inflight = [admission.InFlight(prefill="p", prefill_sent_s=0.5),      # in the beat's "running"
                admission.InFlight(prefill="p", prefill_sent_s=1.5),      # sent after it
                admission.InFlight(decode="d", admitted_s=0.5, kv_blocks=3),
                admission.InFlight(decode="d", admitted_s=None, kv_blocks=3),
                admission.InFlight()]                                    # between backends
    r = admission.rooms(peers, inflight, max_batch=4, decode_slack=2)
    assert r.prefill == {"p": 4 - 1 - 1}
    assert r.decode == {"d": [4 + 2 - 2 - 0 - 1, 50 - 3]}               # the unusable group is no room
    assert r.pending == 3


def test_requests_queue_until_room_and_leave_in_arrival_order() -> None:
    c = pod()
    for i in range(6):
        c.open(f"r{i}", PROMPT, P, 0.0)
    assert c.dispatch(0.0) == ["r0", "r1", "r2"]                 # batch 2 + slack 1
    assert c.load()["queued"] == 3
    for rid in ("r0", "r1", "r2"):
        c.begin_prefill(rid, "prefill-0", 0.1)
    assert c.dispatch(0.1) == []                                  # they hold the group's slots
    c.fail("r0", Code.INTERNAL, "x", 0.2)
    assert c.dispatch(0.2) == ["r3"]


def test_a_full_queue_refuses_naming_the_setting_and_replays_go_first() -> None:
    c = pod(max_waiting=2)
    c.open("a", PROMPT, P, 0.0)
    c.open("b", PROMPT, P, 0.0)
    with pytest.raises(TableFull, match=r"routing.max_waiting = 2") as ei:
        c.open("c", PROMPT, P, 0.0)
    assert ei.value.code is Code.RESOURCE_EXHAUSTED
    c2 = pod()
    for rid in ("old", "n1", "n2"):
        c2.open(rid, PROMPT, P, 0.0)
    assert c2.dispatch(0.0)[0] == "old"
    c2.attach("old")
    c2.begin_prefill("old", "prefill-0", 0.0)
    c2.prefill_answered("old", 10, STAGED, 0.1)
    c2.assign_decode("old", "decode-0", 0.1)
    c2.restart("old", "decode-0 is dead", 0.2)
    assert c2.requests["old"].state is State.ADMITTED and list(c2.replays) == ["old"]
    assert c2.dispatch(0.3)[0] == "old"


def test_a_deadline_in_the_queue_fails_it_saying_where_and_dequeues_it() -> None:
    c = pod()
    for i in range(4):
        c.open(f"r{i}", PROMPT, P, 0.0, deadline_s=5.0)
    c.dispatch(0.0)
    c.attach("r3")
    eff = c.expire("r3", 4.8)
    req = c.requests["r3"]
    assert req.state is State.FAILED and req.error_code is Code.DEADLINE_EXCEEDED
    assert "queue" in req.error and "0 ahead" in req.error
    assert not c.queued("r3") and eff and c.load()["expired"] == 1
    # The tick is a backstop for requests nobody streams.
    c.open("late", PROMPT, P, 0.0, deadline_s=1.0)
    c.tick(0.9)
    assert c.requests.get("late") is None or c.requests["late"].state is State.FAILED


def test_giving_up_lets_go_of_what_backends_hold() -> None:
    c = pod()
    c.open("p", PROMPT, P, 0.0)
    c.attach("p")
    c.begin_prefill("p", "prefill-0", 0.0)
    assert SendCancel("prefill-0", "p") in c.cancel("p", 0.1)      # the prefill drops it
    c.open("s", PROMPT, P, 0.0)
    c.attach("s")
    c.begin_prefill("s", "prefill-0", 0.0)
    c.prefill_answered("s", 10, STAGED, 0.1)                       # prefilled, not yet admitted
    assert ReleaseStage("prefill-0", "s", 7) in c.fail("s", Code.UNAVAILABLE, "x", 0.2)
    c.open("one", PROMPT, SamplingParams(max_tokens=1), 0.0)
    c.attach("one")
    c.begin_prefill("one", "prefill-0", 0.0)
    eff = c.prefill_answered("one", 10, STAGED, 0.1)               # finished at its first token
    assert c.requests["one"].state is State.FINISHED and ReleaseStage("prefill-0", "one", 7) in eff
