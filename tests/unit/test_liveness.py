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
