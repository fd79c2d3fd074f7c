"""The fabric client's lifecycle (modelled -> unmodelled -> modelled), pure: no sockets, clock injected."""

from __future__ import annotations

import pytest

from xccl_net.fabric_state import (CLOSED, MODELLED, TRANSITIONS, UNMODELLED, CameBack, EpochChanged, FabricLink,
                                   IllegalTransition, SendProbe, WentUnmodelled)


def registered_link(epoch: str = "e1") -> FabricLink:
    link = FabricLink("attention-0-0", probe_interval_s=0.2)
    assert link.registered(epoch, 0.0) == []
    return link


def test_modelled_transfers_are_reserved_and_not_counted():
    link = registered_link()
    assert all(link.admit() for _ in range(5))
    assert link.unmodelled_transfers == 0 and link.load()["fabric_modelled"] == 1.0


def test_a_miss_goes_unmodelled_once_then_transfers_skip_the_simulator():
    link = registered_link()
    link.settle_unmodelled()                      # the reservation that missed goes on untimed
    effects = link.missed(10.0, "did not answer within 0.25s")
    assert effects == [WentUnmodelled("did not answer within 0.25s", 1), SendProbe(10.2)]
    assert link.state == UNMODELLED
    # Other reservations in flight expiring later: no second warning, no second probe schedule.
    link.settle_unmodelled()
    assert link.missed(10.05, "late") == []
    # New transfers do not ask the simulator (no per-transfer timeout) and are counted.
    assert [link.admit() for _ in range(3)] == [False] * 3
    assert link.unmodelled_transfers == 5
    assert link.load() == {"fabric_unmodelled_transfers": 5.0, "fabric_modelled": 0.0, "fabric_outages": 1.0}


def test_probes_are_paced_by_the_interval():
    link = registered_link()
    link.missed(1.0, "x")
    assert link.probe(1.2) == [SendProbe(pytest.approx(1.4))]
    assert link.probe(1.4) == [SendProbe(pytest.approx(1.6))]
    assert link.probes == 3


def test_continued_simulator_same_epoch_comes_back_not_restarted():
    link = registered_link("e1")
    link.missed(5.0, "x")
    for _ in range(4):
        link.admit()
    (back,) = link.registered("e1", 8.0)
    assert back == CameBack(pytest.approx(3.0), 4, restarted=False)
    assert link.state == MODELLED and link.admit()
    assert link.unmodelled_transfers == 4          # stops growing once modelled again


def test_restarted_simulator_new_epoch_comes_back_restarted_and_outages_count():
    link = registered_link("e1")
    link.missed(1.0, "x")
    link.admit()
    (back,) = link.registered("e2", 1.5)
    assert back.restarted and back.unmodelled == 1 and link.epoch == "e2"
    link.missed(2.0, "y")
    (back,) = link.registered("e2", 2.1)
    assert not back.restarted and back.unmodelled == 0 and link.outages == 2


def test_late_probe_acks_while_modelled_change_nothing_but_a_new_epoch_is_reported():
    link = registered_link("e1")
    assert link.registered("e1", 1.0) == []        # a late ack of an old probe
    assert link.registered("e2", 2.0) == [EpochChanged("e2")]   # fast restart seen by a re-registration
    assert link.state == MODELLED


def test_client_started_while_simulator_down_comes_back_not_restarted():
    link = FabricLink("x")
    link.missed(0.0, "no answer to registration")
    (back,) = link.registered("e1", 0.4)
    assert not back.restarted and link.modelled


def test_illegal_transitions_name_owner_state_and_event():
    link = registered_link()
    with pytest.raises(IllegalTransition, match=r"attention-0-0.*'modelled'.*'probe'"):
        link.probe(1.0)
    link.close()
    assert link.state == CLOSED
    for call in (lambda: link.admit(), lambda: link.missed(1.0, "x"), lambda: link.registered("e", 1.0)):
        with pytest.raises(IllegalTransition) as info:
            call()
        assert info.value.state == CLOSED
    link.close()  # idempotent


def test_table_has_no_way_out_of_closed_and_every_state_can_close():
    assert not any(state == CLOSED for state, _ in TRANSITIONS)
    assert {TRANSITIONS[(s, "close")] for s in (MODELLED, UNMODELLED)} == {CLOSED}


def test_bad_probe_interval_is_rejected():
    with pytest.raises(ValueError, match="probe_interval_s"):
        FabricLink("x", probe_interval_s=0)
