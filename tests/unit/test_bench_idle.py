"""The idle benchmark's arithmetic: /proc parsing, one window, medians and the goal."""

import os

import pytest

from services.bench.idle import FLOOR, Sample, parse_stat, parse_switches, sample, summarise, window


def test_parse_stat_handles_a_command_name_with_spaces_and_parens():
    fields = ["S", "7"] + ["0"] * 9 + ["120", "30"] + ["0"] * 4 + ["3", "0", "4242"] + ["0"] * 20
    ticks, threads, start, ppid = parse_stat("123 (a) b (c) " + " ".join(fields))
    assert (ticks, threads, start, ppid) == (150, 3, 4242, 7)


def test_parse_switches_adds_voluntary_and_involuntary():
    status = "Name:\tx\nvoluntary_ctxt_switches:\t10\nnonvoluntary_ctxt_switches:\t5\n"
    assert parse_switches(status) == 15


def test_sample_of_this_process_reads_every_thread():
    s = sample(os.getpid())
    assert s.threads >= 1 and s.switches > 0 and s.cpu_s > 0
    with pytest.raises(ProcessLookupError):
        sample(2 ** 22 + 1)   # above pid_max's default ceiling: no such process


def test_window_rates_and_restart_detection():
    a = {"x": Sample(1.0, 100, 3, 50)}
    b = {"x": Sample(1.5, 300, 4, 50)}
    assert window(a, b, 10.0) == {"x": {"cpu_pct": 5.0, "wakeups_per_s": 20.0, "threads": 4.0}}
    with pytest.raises(KeyError, match="restarted"):
        window(a, {"x": Sample(0.1, 1, 1, 51)}, 10.0)


def test_summarise_takes_medians_excludes_the_floor_and_judges_the_goal():
    def w(x, y, f):
        return {"x": {"cpu_pct": x, "wakeups_per_s": 10 * x, "threads": 2.0},
                "y": {"cpu_pct": y, "wakeups_per_s": 10 * y, "threads": 2.0},
                FLOOR: {"cpu_pct": f, "wakeups_per_s": 1.0, "threads": 1.0}}
    r = summarise([w(1.0, 2.5, 0.1), w(3.0, 2.5, 0.1), w(2.0, 9.0, 0.1)], goal_pct=5.0)
    assert r["processes"] == 2 and r["total_cpu_pct_per_window"] == [3.5, 5.5, 11.0]
    assert r["total_cpu_pct_of_one_core"] == 5.5 and r["goal_met"] is False
    assert list(r["per_service"]) == ["y", "x"] and r["per_service"]["x"]["cpu_pct"] == 2.0
    assert r["floor"]["cpu_pct_times_processes"] == 0.2 and r["total_over_floor"] == 27.5
    assert summarise([w(1.0, 1.0, 0.0)], goal_pct=5.0)["goal_met"] is True
