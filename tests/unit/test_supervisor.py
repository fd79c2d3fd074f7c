"""The restart policy (services/pod/supervisor.py): backoff, its reset, the crash-loop limit."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.pod.spec import SupervisionSpec, pod_from_mapping
from services.pod.supervisor import GiveUp, IllegalTransition, Restart, Supervisor

CFG = SupervisionSpec(backoff_initial_s=0.1, backoff_max_s=1.0, stable_after_s=10.0, max_restarts=5, window_s=60.0)


def crash_and_restart(sup: Supervisor, name: str, now: float) -> Restart | GiveUp:
    """One failure; if a restart is decided, start it at its time and let it become ready."""
    d = sup.exited(name, now)
    if isinstance(d, Restart):
        sup.restarting(name)
        sup.ready(name, d.at_s)
    return d


def test_backoff_doubles_to_the_cap() -> None:
    sup = Supervisor(SupervisionSpec(backoff_initial_s=0.1, backoff_max_s=1.0, max_restarts=100, window_s=60.0))
    sup.ready("expert-0", 0.0)
    now, delays = 0.0, []
    for _ in range(6):
        d = crash_and_restart(sup, "expert-0", now + 0.5)   # dies 0.5 s after each ready: not stable
        assert isinstance(d, Restart)
        delays.append(d.delay_s)
        assert d.at_s == pytest.approx(now + 0.5 + d.delay_s)
        now = d.at_s
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert sup.restarts == {"expert-0": 6}
    assert sup.state("expert-0") == "running"


def test_a_stable_run_resets_the_backoff() -> None:
    sup = Supervisor(CFG)
    sup.ready("router-0", 0.0)
    assert crash_and_restart(sup, "router-0", 1.0).delay_s == pytest.approx(0.1)
    assert crash_and_restart(sup, "router-0", 2.0).delay_s == pytest.approx(0.2)
    d = crash_and_restart(sup, "router-0", 2.2 + CFG.stable_after_s)   # ready for stable_after_s
    assert d.delay_s == pytest.approx(0.1)


def test_a_restart_that_dies_before_ready_backs_off_further() -> None:
    sup = Supervisor(CFG)
    sup.ready("prefill-0", 0.0)
    d = sup.exited("prefill-0", 100.0)
    sup.restarting("prefill-0")
    assert sup.state("prefill-0") == "starting"
    d2 = sup.exited("prefill-0", d.at_s + 0.3)       # exit code 1 during start
    assert isinstance(d2, Restart) and d2.delay_s == pytest.approx(0.2)
    assert sup.state("prefill-0") == "backing_off"


def test_crash_loop_gives_up_after_max_restarts_in_the_window() -> None:
    sup = Supervisor(SupervisionSpec(max_restarts=3, window_s=10.0, backoff_initial_s=0.1, backoff_max_s=0.1))
    sup.ready("expert-1", 0.0)
    for t in (1.0, 2.0, 3.0):
        assert isinstance(crash_and_restart(sup, "expert-1", t), Restart)
    d = sup.exited("expert-1", 4.0)
    assert d == GiveUp("expert-1", 4, 10.0)
    assert "expert-1" in d.message and "crash-loops" in d.message
    assert sup.state("expert-1") == "gave_up"
    with pytest.raises(IllegalTransition, match="expert-1"):
        sup.restarting("expert-1")


def test_failures_older_than_the_window_do_not_count() -> None:
    sup = Supervisor(SupervisionSpec(max_restarts=2, window_s=10.0, backoff_initial_s=0.1, backoff_max_s=0.1))
    sup.ready("kvpool-0", 0.0)
    for t in (1.0, 2.0, 12.5, 13.0, 22.6):   # never more than 2 failures within 10 s
        assert isinstance(crash_and_restart(sup, "kvpool-0", t), Restart), t
    assert isinstance(sup.exited("kvpool-0", 23.0), GiveUp)   # 13.0, 22.6, 23.0


def test_services_are_independent_and_zero_restarts_gives_up_at_once() -> None:
    sup = Supervisor(SupervisionSpec(max_restarts=0))
    sup.ready("a", 0.0)
    sup.ready("b", 0.0)
    assert isinstance(sup.exited("a", 1.0), GiveUp)
    assert sup.state("b") == "running" and sup.restarts == {}


def test_illegal_transition_names_service_state_and_event() -> None:
    sup = Supervisor(CFG)
    sup.ready("decode-0", 0.0)
    with pytest.raises(IllegalTransition, match=r"decode-0 .*'restarting'.*'running'"):
        sup.restarting("decode-0")


def test_spec_settings_are_typed_and_checked() -> None:
    spec = pod_from_mapping({"supervision": {"max_restarts": 2, "backoff_max_s": 1.5}})
    assert spec.supervision.max_restarts == 2 and spec.supervision.backoff_max_s == 1.5
    with pytest.raises(ConfigError, match="supervision.backof_max_s"):
        pod_from_mapping({"supervision": {"backof_max_s": 1.0}})
    with pytest.raises(ConfigError, match="supervision.backoff_max_s"):
        pod_from_mapping({"supervision": {"backoff_initial_s": 2.0, "backoff_max_s": 1.0}})
    with pytest.raises(ConfigError, match="supervision.window_s"):
        pod_from_mapping({"supervision": {"window_s": 0}})
