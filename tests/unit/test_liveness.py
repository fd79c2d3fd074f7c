from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.common.liveness import (TRANSITIONS, DetectorConfig, Event, FailureDetector,
                                      IllegalTransition, Liveness)

CFG = DetectorConfig(suspect_after_s=0.3, dead_after_s=1.0)


def states(changes):
    return [(c.peer, c.old, c.new) for c in changes]


def test_alive_suspect_dead_by_silence_and_back_by_beat() -> None:
    d = FailureDetector(CFG)
    assert states(d.observe("p", "e1", 0.0)) == [("p", None, Liveness.ALIVE)]
    assert d.tick(0.29) == []
    assert states(d.tick(0.31)) == [("p", Liveness.ALIVE, Liveness.SUSPECT)]
    assert d.tick(0.5) == []
    assert states(d.observe("p", "e1", 0.6)) == [("p", Liveness.SUSPECT, Liveness.ALIVE)]
    assert states(d.tick(1.0)) == [("p", Liveness.ALIVE, Liveness.SUSPECT)]
    assert states(d.tick(1.61)) == [("p", Liveness.SUSPECT, Liveness.DEAD)]
    assert d.tick(5.0) == [] and d.state("p") is Liveness.DEAD


def test_dead_is_final_for_an_epoch_and_a_restart_revives() -> None:
    d = FailureDetector(CFG)
    d.observe("p", "e1", 0.0)
    d.tick(2.0)
    assert d.state("p") is Liveness.DEAD
    assert d.observe("p", "e1", 2.1) == [] and d.ignored_beats == 1   # SIGCONT of a hung process
    assert states(d.observe("p", "e2", 2.2)) == [("p", Liveness.DEAD, Liveness.ALIVE)]
    assert d.peers["p"].epoch == "e2"


def test_long_silence_goes_straight_to_dead_and_info_is_kept() -> None:
    d = FailureDetector(CFG)
    d.observe("a", "x", 0.0, {"running": 3})
    d.observe("b", "y", 0.0)
    d.observe("b", "y", 4.9)
    assert states(d.tick(5.0)) == [("a", Liveness.ALIVE, Liveness.DEAD)]
    assert list(d.alive()) == ["b"] and d.peers["a"].info == {"running": 3}


def test_illegal_transition_names_peer_state_and_event() -> None:
    d = FailureDetector(CFG)
    d.observe("p", "e", 0.0)
    d.tick(3.0)
    with pytest.raises(IllegalTransition, match="'p'.*'beat'.*'dead'"):
        d._apply("p", d.peers["p"], Event.BEAT)
    assert (Liveness.DEAD, Event.BEAT) not in TRANSITIONS


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="suspect_after_s"):
        DetectorConfig(suspect_after_s=2.0, dead_after_s=1.0)


def test_next_due_is_the_earliest_silence_deadline_and_ticking_then_changes_state() -> None:
    d = FailureDetector(CFG)
    assert d.next_due() is None                      # nobody known: nothing can fall silent
    d.observe("a", "x", 0.0)
    d.observe("b", "y", 0.1)
    assert d.next_due() == pytest.approx(0.3)        # a's suspect deadline
    d.observe("a", "x", 0.2)
    assert d.next_due() == pytest.approx(0.4)        # now b's: a beat moves a's deadline later
    assert d.tick(0.39) == [] and d.next_due() == pytest.approx(0.4)
    assert states(d.tick(d.next_due())) == [("b", Liveness.ALIVE, Liveness.SUSPECT)]
    assert d.next_due() == pytest.approx(0.5)        # a's suspect deadline comes first
    assert states(d.tick(0.5)) == [("a", Liveness.ALIVE, Liveness.SUSPECT)]
    assert d.next_due() == pytest.approx(1.1)        # b suspect since 0.1: dead at 1.1
    assert states(d.tick(1.1)) == [("b", Liveness.SUSPECT, Liveness.DEAD)]
    assert states(d.tick(d.next_due())) == [("a", Liveness.SUSPECT, Liveness.DEAD)]
    assert d.next_due() is None                      # dead is final: no deadline left
    d.observe("b", "y2", 3.0)                        # a restart brings a deadline back
    assert d.next_due() == pytest.approx(3.3)


def test_ticking_only_at_next_due_detects_exactly_when_fixed_ticks_would() -> None:
    """Driven by ``next_due`` alone, every transition happens at its deadline: never later
    than a fixed tick would find it, and with a wake-up only per deadline."""
    import random
    rng = random.Random(7)
    beats = sorted((rng.uniform(0, 6), rng.choice("abc")) for _ in range(40))
    fixed, lazy = FailureDetector(CFG), FailureDetector(CFG)
    got_fixed, got_lazy, wakeups = [], [], 0
    t, i = 0.0, 0
    while t < 8.0:   # fixed ticks every 1 ms: the reference
        while i < len(beats) and beats[i][0] <= t:
            got_fixed += [(round(beats[i][0], 3), c.peer, c.new) for c in fixed.observe(beats[i][1], "e", beats[i][0])]
            i += 1
        got_fixed += [(round(t, 3), c.peer, c.new) for c in fixed.tick(t)]
        t += 0.001
    for at, peer in beats + [(8.0, None)]:
        while (due := lazy.next_due()) is not None and due <= at:
            wakeups += 1
            got_lazy += [(round(due, 3), c.peer, c.new) for c in lazy.tick(due)]
        if peer is not None:
            got_lazy += [(round(at, 3), c.peer, c.new) for c in lazy.observe(peer, "e", at)]
    assert [(p, s) for _, p, s in got_lazy] == [(p, s) for _, p, s in got_fixed]
    assert all(abs(a[0] - b[0]) <= 0.0011 for a, b in zip(got_lazy, got_fixed))
    assert wakeups < 8000 / 100


def test_next_slot_is_on_the_shared_grid_and_never_closer_than_half_an_interval() -> None:
    from services.common.heartbeat import next_slot
    assert next_slot(10.0, 0.2) == pytest.approx(10.2)          # on time: one interval
    assert next_slot(10.05, 0.2) == pytest.approx(10.2)         # late: back onto the grid
    assert next_slot(9.9995, 0.2) == pytest.approx(10.2)        # a timer that fired early: no double beat
    assert next_slot(10.11, 0.2) == pytest.approx(10.4)         # late by over half: the slot after
    for now in (0.0, 3.33, 7.19999, 123.456):
        t = next_slot(now, 0.2)
        assert 0.1 <= t - now <= 0.3 and abs(t / 0.2 - round(t / 0.2)) < 1e-6
