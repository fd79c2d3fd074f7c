"""The chaos tool's pure parts: the scenario schema, the planner and the judge (no pod)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from services.chaos.plan import plan, workload
from services.chaos.scenario import Checks, load_scenario, scenario_from_mapping
from services.chaos.timeline import (FaultRecord, LivenessEvent, StreamRecord, back_s, degraded_window, exactness,
                                     lanes, progress_s, recovery, throughput_series, verdict)
from services.common.config import ConfigError
from services.pod.spec import PodSpec, services

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "chaos").glob("*.yaml"))
POD = services(PodSpec())
CLOSED = {"streams": 4, "max_tokens": [8, 8]}


def sc(**kw):
    return scenario_from_mapping({"name": "t", "load": CLOSED, **kw})


# -- schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_loads_and_plans_against_the_default_pod(path):
    s = load_scenario(path)
    p = plan(s, POD, 1.5)
    assert len(p.faults) == len(s.faults) and p.requests


def test_at_least_the_six_issue_examples_ship():
    names = {p.stem for p in EXAMPLES}
    assert {"kill-each-role", "hang-expert", "link-down-attention-expert", "partition-dp-group",
            "straggler-expert", "two-faults-at-once"} <= names


@pytest.mark.parametrize("data, where", [
    ({"name": "t", "load": CLOSED, "fautls": []}, "Scenario.fautls"),
    ({"name": "t", "load": {**CLOSED, "stream": 3}}, "Scenario.load.stream"),
    ({"name": "t", "load": CLOSED, "faults": [{"kind": "kill", "target": {"role": "expert"}, "at_s": 1,
                                                "tagret": 1}]}, "tagret"),
    ({"name": "t", "load": CLOSED, "faults": [{"kind": "kill", "target": {"role": "expret"}, "at_s": 1}]}, "faults[0].target: must be one of"),
    ({"name": "t", "load": CLOSED, "checks": {"max_error": 1}}, "Scenario.checks.max_error"),
])
def test_unknown_keys_and_values_are_rejected_by_name(data, where):
    with pytest.raises(ConfigError) as info:
        scenario_from_mapping(data)
    assert where in str(info.value)


@pytest.mark.parametrize("fault, words", [
    ({"kind": "kill", "target": {"role": "expert"}}, "exactly one trigger"),
    ({"kind": "kill", "target": {"role": "expert"}, "at_s": 1, "after_tokens": 3}, "exactly one trigger"),
    ({"kind": "kill", "target": {"role": "expert"}, "at_s": 1, "duration_s": 2}, "instantaneous"),
    ({"kind": "kill", "at_s": 1}, "target"),
    ({"kind": "kill", "target": {"service": "expert-1", "role": "expert"}, "at_s": 1}, "alone"),
    ({"kind": "hang", "target": {"role": "expert"}, "at_s": 1, "delay_ms": 5}, "does not apply"),
    ({"kind": "latency", "between": [{"service": "a"}, {"service": "b"}], "at_s": 1}, "added_latency_us"),
    ({"kind": "bandwidth", "links": ["npu1.rx"], "bandwidth_factor": 1.5, "at_s": 1}, "bandwidth_factor"),
    ({"kind": "link_down", "at_s": 1}, "exactly one of between"),
    ({"kind": "link_down", "between": [{"service": "a"}], "at_s": 1}, "exactly two"),
    ({"kind": "partition", "at_s": 1}, "partition"),
    ({"kind": "straggler", "target": {"role": "expert"}, "at_s": 1}, "delay_ms"),
])
def test_fault_rules(fault, words):
    with pytest.raises(ConfigError, match=words):
        sc(faults=[fault])


def test_load_rules():
    with pytest.raises(ConfigError, match="either streams"):
        scenario_from_mapping({"name": "t", "load": {}})
    with pytest.raises(ConfigError, match="min <= max"):
        scenario_from_mapping({"name": "t", "load": {"streams": 1, "max_tokens": [9, 3]}})
    with pytest.raises(ConfigError, match="closed load"):
        scenario_from_mapping({"name": "t", "load": {"rate_rps": 1, "duration_s": 3},
                               "faults": [{"kind": "kill", "target": {"role": "expert"}, "after_tokens": 3}]})
    with pytest.raises(ConfigError, match="no previous"):
        sc(faults=[{"kind": "kill", "target": {"role": "expert"}, "after_previous": True}])


# -- planner -----------------------------------------------------------------------------------
def test_role_targets_are_picked_deterministically_by_seed():
    f = [{"kind": "kill", "target": {"role": "expert"}, "at_s": 1}]
    picks = {seed: plan(sc(seed=seed, faults=f), POD, 1.5).faults[0].services for seed in range(8)}
    assert picks == {seed: plan(sc(seed=seed, faults=f), POD, 1.5).faults[0].services for seed in range(8)}
    assert len(set(picks.values())) > 1      # the seed matters
    assert all(p[0].startswith("expert-") for p in picks.values())


def test_exact_names_unknown_services_and_fabricless_members():
    assert plan(sc(faults=[{"kind": "kill", "target": {"service": "decode-1"}, "at_s": 1}]), POD, 1.5
                ).faults[0].services == ("decode-1",)
    with pytest.raises(ConfigError, match="no service of this pod is expert-9"):
        plan(sc(faults=[{"kind": "kill", "target": {"service": "expert-9"}, "at_s": 1}]), POD, 1.5)
    with pytest.raises(ConfigError, match="no NPU"):
        plan(sc(faults=[{"kind": "link_down", "between": [{"service": "router-0"}, {"service": "expert-0"}],
                         "at_s": 1}]), POD, 1.5)
    with pytest.raises(ConfigError, match="straggler must be an expert"):
        plan(sc(faults=[{"kind": "straggler", "target": {"service": "decode-0"}, "delay_ms": 5, "at_s": 1}]), POD, 1.5)


def test_fabric_faults_resolve_to_npus_and_links():
    by = {s.name: s for s in POD}
    p = plan(sc(faults=[
        {"kind": "link_down", "between": [{"service": "attention-0-0"}, {"service": "expert-1"}], "at_s": 1},
        {"kind": "latency", "between": [{"service": "attention-0-0"}, {"service": "expert-1"}], "at_s": 1,
         "added_latency_us": 50},
        {"kind": "partition", "partition": {"a": [{"group": 0}], "b": [{"role": "expert"}]}, "at_s": 1},
    ]), POD, 1.5)
    cut, lat, part = p.faults
    a, e = by["attention-0-0"].npu, by["expert-1"].npu
    assert cut.pair_cut and (cut.npus_a, cut.npus_b) == ((a,), (e,)) and not cut.links
    assert lat.links == (f"npu{a}.tx", f"npu{e}.rx", f"npu{e}.tx", f"npu{a}.rx")
    assert set(part.side_a) == {"attention-0-0", "decode-0"}
    assert part.side_b == ("expert-0", "expert-1", "expert-2", "expert-3")
    assert set(part.npus_a) == {by["attention-0-0"].npu, by["decode-0"].npu}


def test_hang_lasts_three_dead_after_windows_unless_told():
    p = plan(sc(faults=[{"kind": "hang", "target": {"role": "expert"}, "at_s": 1},
                        {"kind": "hang", "target": {"role": "expert"}, "at_s": 1, "duration_s": 2}]), POD, 1.5)
    assert [f.duration_s for f in p.faults] == [4.5, 2]


def test_workload_is_deterministic_and_within_bounds():
    s = scenario_from_mapping({"name": "t", "seed": 3, "load": {"streams": 20, "prompt_bytes": [5, 40],
                                                               "max_tokens": [10, 12], "sampling": "mixed"}})
    w = workload(s)
    assert w == workload(s)
    assert all(5 >= 1 and 1 <= len(r.prompt.encode()) <= 40 and 10 <= r.max_tokens <= 12 for r in w)
    assert all(bool(r.sampling) == (r.index % 2 == 1) for r in w)
    assert len({r.sampling["seed"] for r in w if r.sampling}) == 10
    opened = scenario_from_mapping({"name": "t", "load": {"rate_rps": 4, "duration_s": 2.5}})
    assert [r.start_s for r in workload(opened)] == [i / 4 for i in range(10)]


# -- judge -------------------------------------------------------------------------------------
def stream(i, t_start, arrivals, finish="length", end=None, code=""):
    return StreamRecord(i, f"r{i}", t_start, [(t, 1) for t in arrivals], [0] * len(arrivals), finish, code, "",
                        end if end is not None else (arrivals[-1] if arrivals else t_start))


def test_progress_is_the_worst_in_flight_stream_first_token_after_the_fault():
    streams = [stream(0, 0, [0.5, 1.0, 4.0, 4.5]), stream(1, 0, [0.5, 2.5, 3.0]),
               stream(2, 0, [0.5, 0.9], end=0.9),        # finished before the fault: not in flight
               stream(3, 3.0, [3.5])]                     # started after the fault
    assert progress_s(streams, 2.0, 2.0, 1.0, math.inf) == pytest.approx(2.0)
    failed = stream(4, 0, [0.5], finish="", end=3.0, code="UNAVAILABLE")
    assert progress_s(streams + [failed], 2.0, 2.0, 1.0, math.inf) is None


def test_one_more_token_from_a_step_in_flight_does_not_hide_the_stall_after_it():
    # Fault at 2.0 active until 4.0; a token at 2.05 (a step already in flight), then nothing until 5.1.
    s = [stream(0, 0, [1.8, 1.9, 2.05, 5.1, 5.2])]
    assert progress_s(s, 2.0, 4.0, 1.0, math.inf) == pytest.approx(3.1)
    # Seen live at 3.5: stalled now, so not recovered; at 4.5 still stalled; never judged before
    # the fault's end + one stall window.
    live = [StreamRecord(0, "r", 0, [(1.9, 1), (2.05, 1)], [0, 0])]
    assert progress_s(live, 2.0, 4.0, 1.0, 3.5) is None
    assert progress_s(live, 2.0, 4.0, 1.0, 5.5) is None
    # A gap that began after the fault ended is not the fault's.
    late = [stream(0, 0, [1.9, 2.1, 2.2, 4.5, 7.0])]
    assert progress_s(late, 2.0, 4.0, 1.0, math.inf) == pytest.approx(2.5)


def test_back_needs_a_new_epoch_after_a_kill_and_alive_after_sigcont_for_a_hang():
    ev = [LivenessEvent(0, "expert-1", "alive", "e1"), LivenessEvent(2.5, "expert-1", "suspect", "e1"),
          LivenessEvent(3.5, "expert-1", "dead", "e1"), LivenessEvent(6.0, "expert-1", "alive", "e2")]
    assert back_s(ev, "expert-1", "kill", 2.0, "e1", None) == pytest.approx(4.0)
    assert back_s(ev[:3], "expert-1", "kill", 2.0, "e1", None) is None
    assert back_s(ev, "expert-1", "hang", 2.0, "e1", 5.0) == pytest.approx(4.0)
    short = [LivenessEvent(0, "expert-1", "alive", "e1"), LivenessEvent(2.5, "expert-1", "suspect", "e1"),
             LivenessEvent(2.9, "expert-1", "alive", "e1")]
    assert back_s(short, "expert-1", "hang", 2.0, "e1", 2.7) == pytest.approx(0.9)
    fab = [LivenessEvent(0, "fabric", "alive"), LivenessEvent(2.2, "fabric", "dead"), LivenessEvent(3.1, "fabric", "alive")]
    assert back_s(fab, "fabric", "kill", 2.0, "", None) == pytest.approx(1.1)


def test_recovery_is_the_later_of_progress_and_back():
    streams = [stream(0, 0, [0.5, 1.0, 2.6, 3.0])]
    ev = [LivenessEvent(0, "decode-0", "alive", "a"), LivenessEvent(5.0, "decode-0", "alive", "b")]
    rec = FaultRecord(0, "#0 kill decode-0", "kill", ("decode-0",), t_inject=2.0, old_epochs={"decode-0": "a"})
    r = recovery(rec, streams, ev, stall_s=1.0, now=math.inf)
    assert (r.progress_s, r.back_s, r.recovery_s) == (pytest.approx(0.6), pytest.approx(3.0), pytest.approx(3.0))
    link = FaultRecord(1, "#1 link_down", "link_down", ("a", "b"), t_inject=2.0, t_revert=2.2)
    r2 = recovery(link, streams, ev, stall_s=1.0, now=math.inf)
    assert r2.recovery_s == pytest.approx(0.6) and not r2.back_applies
    assert degraded_window(link, r2, 10.0) == (2.0, 3.0)   # at least one second


def test_verdict_names_every_failed_check():
    rec = [FaultRecord(0, "#0 kill x", "kill", ("x",), t_inject=1.0),
           FaultRecord(1, "#1 hang y", "hang", ("y",), error="pid 5 not stopped")]
    rcv = [recovery(r, [], [], stall_s=1.0, now=math.inf) for r in rec]
    failed = verdict(Checks(max_errors=0, max_recovery_s=5, min_degraded_tokens_per_s=10), rec, rcv, [3.0, None],
                     {"UNAVAILABLE": 2}, {"checked": 3, "exact": 2, "mismatched": [1]})
    text = "\n".join(failed)
    for words in ("pid 5 not stopped", "errors: 2 > max_errors 0", "streams [1] differ", "never recovered",
                  "3.0 tokens/s"):
        assert words in text
    assert verdict(Checks(), [], [], [], {}, {"checked": 1, "exact": 1, "mismatched": []}) == []


def test_exactness_allows_a_failed_stream_a_correct_prefix_only():
    good = StreamRecord(0, "a", 0, tokens=[1, 2, 3], finish="length")
    prefix = StreamRecord(1, "b", 0, tokens=[4], error_code="UNAVAILABLE")
    wrong = StreamRecord(2, "c", 0, tokens=[9], error_code="UNAVAILABLE")
    assert exactness([good, prefix, wrong], [[1, 2, 3], [4, 5], [7, 8]])["mismatched"] == [2]


def test_series_and_lanes():
    streams = [stream(0, 0, [0.1, 0.2, 0.7]), stream(1, 0, [1.2])]
    assert throughput_series(streams, 1.4) == [(0.0, 4.0), (0.5, 2.0), (1.0, 2.0)]
    ev = [LivenessEvent(0.0, "a", "alive", "1"), LivenessEvent(1.0, "a", "suspect", "1"),
          LivenessEvent(2.0, "a", "dead", "1"), LivenessEvent(3.0, "a", "alive", "2")]
    assert lanes(ev, ["a", "b"], 4.0) == {"a": [(0.0, 1.0, "alive"), (1.0, 2.0, "suspect"), (2.0, 3.0, "dead"),
                                                (3.0, 4.0, "alive")], "b": [(0.0, 4.0, "unknown")]}


def test_the_readme_example_is_a_valid_scenario():
    import yaml
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Chaos experiments"):]
    block = section[section.index("```yaml\n") + 8:]
    s = scenario_from_mapping(yaml.safe_load(block[:block.index("```")]))
    assert plan(s, POD, 1.5).faults[1].services == ("decode-1",)


def test_a_restart_faster_than_the_suspect_window_still_shows_as_back() -> None:
    """A supervised service killed and restarted before its peers even suspect it: the detector
    sees alive -> alive (no change), yet the new epoch is the service back, and the lane says so."""
    import types

    from services.chaos.runner import Watch
    from services.common.heartbeat import Beat

    pod = types.SimpleNamespace(spec=PodSpec(), address=lambda name, plane: f"ipc:///tmp/xds-nowhere-{name}")
    t = [0.0]
    watch = Watch(pod, clock=lambda: t[0])
    try:
        def beat(epoch: str, seq: int, now: float) -> None:
            t[0] = now
            b = Beat("kvpool-0", "kv-pool", epoch, seq)
            for c in watch.detector.observe(b.service, b.epoch, now, {}):
                watch._on_change(c)
            watch._on_beat(b)

        beat("old", 1, 0.0)
        beat("old", 2, 0.2)
        old = watch.epoch("kvpool-0")
        beat("new", 1, 0.5)     # restarted within suspect_after_s of the last beat
        beat("new", 2, 0.7)
        assert [(e.t, e.state, e.epoch) for e in watch.events if e.service == "kvpool-0"] == \
            [(0.0, "alive", "old"), (0.5, "alive", "new")]
        assert back_s(watch.events, "kvpool-0", "kill", 0.3, old, None) == pytest.approx(0.2)
    finally:
        watch.sub._sock.close(0)
