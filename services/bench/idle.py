"""`xds bench idle`: how much CPU a pod started by `xds up` burns while nothing happens.

Every pod process (the services and fabric simulator by the PIDs in the ready file, plus the
`xds up` supervisor, their parent) is sampled from /proc before and after each window of
``--seconds``: CPU time and wake-ups (voluntary + involuntary context switches), both summed
over every thread in /proc/PID/task (CPU from schedstat's nanoseconds where the kernel has it,
else utime + stime ticks). On this kind of VM every wake-up of a process costs ~100 µs of CPU
(a bare uvloop timer included), so wake-ups are what to cut.
The floor, measured over the same windows: one bare process sleeping in uvloop
(``uvloop.run(asyncio.sleep(S))``), the least any asyncio service can cost.

Prints per-service CPU % of one core and wake-ups/s, the pod total, the floor times the
process count, and whether the total meets the goal (``--goal-pct``, issue 13: < 5 %).
With ``--repeat N`` the windows are taken back to back and every figure is the median.
Exit code 1 when the goal is missed or a process went away during the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOAL_PCT = 5.0
FLOOR = "floor"   # the bare-uvloop baseline process
SUPERVISOR = "xds-up"
_FLOOR_CODE = ("import asyncio, sys, uvloop\nprint('ready', flush=True)\n"
               "uvloop.run(asyncio.sleep(float(sys.argv[1])))")


@dataclass(frozen=True, slots=True)
class Sample:
    """One process at one instant: CPU seconds and context switches of its living threads
    (CPU from schedstat, in ns, else from stat's 10 ms ticks), thread count and start time
    (to notice a PID reused)."""

    cpu_s: float
    switches: int
    threads: int
    start_ticks: int


def parse_stat(text: str) -> tuple[int, int, int, int]:
    """/proc/PID/stat -> (utime + stime ticks, num_threads, start time ticks, ppid)."""
    f = text.rsplit(")", 1)[1].split()   # fields after the command name, from field 3 (state)
    return int(f[11]) + int(f[12]), int(f[17]), int(f[19]), int(f[1])


def parse_switches(status: str) -> int:
    """voluntary_ctxt_switches + nonvoluntary_ctxt_switches of one /proc/.../status."""
    n = 0
    for line in status.splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            n += int(line.split()[1])
    return n


def sample(pid: int, hz: int = os.sysconf("SC_CLK_TCK")) -> Sample:
    """Raises ``ProcessLookupError`` when the process is gone."""
    try:
        ticks, threads, start, _ = parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    switches, run_ns, have_ns = 0, 0, True
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            switches += parse_switches((task / "status").read_text())
            if have_ns:
                run_ns += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass   # a thread that ended between listing and reading
        except (OSError, ValueError, IndexError):
            have_ns = False   # no schedstat (kernel without it): the ticks will do
    return Sample(run_ns / 1e9 if have_ns else ticks / hz, switches, threads, start)


def window(before: dict[str, Sample], after: dict[str, Sample], seconds: float) -> dict[str, dict[str, float]]:
    """Per process: CPU % of one core and wake-ups per second over one window. A process whose
    start time changed (restarted under the same PID) or that is missing after raises KeyError."""
    out = {}
    for name, a in before.items():
        b = after[name]
        if b.start_ticks != a.start_ticks:
            raise KeyError(f"{name}: restarted during the window")
        out[name] = {"cpu_pct": 100.0 * (b.cpu_s - a.cpu_s) / seconds,
                     "wakeups_per_s": max(0, b.switches - a.switches) / seconds,
                     "threads": float(b.threads)}
    return out


def summarise(windows: list[dict[str, dict[str, float]]], goal_pct: float) -> dict[str, Any]:
    """Medians over the windows; the pod total excludes the floor process, which is reported
    alone and times the number of pod processes (what the pod would cost if every process
    were a bare sleeping loop)."""
    names = [n for n in windows[0] if n != FLOOR]
    med = {n: {k: statistics.median(w[n][k] for w in windows) for k in ("cpu_pct", "wakeups_per_s", "threads")}
           for n in windows[0]}
    totals = [sum(w[n]["cpu_pct"] for n in names) for w in windows]
    wakeups = [sum(w[n]["wakeups_per_s"] for n in names) for w in windows]
    total = statistics.median(totals)
    floor = med[FLOOR]["cpu_pct"] if FLOOR in med else None
    per_service = {n: {"cpu_pct": round(med[n]["cpu_pct"], 2), "wakeups_per_s": round(med[n]["wakeups_per_s"], 1),
                       "threads": int(med[n]["threads"])}
                   for n in sorted(names, key=lambda n: -med[n]["cpu_pct"])}
    out: dict[str, Any] = {
        "processes": len(names),
        "windows": len(windows),
        "total_cpu_pct_of_one_core": round(total, 2),
        "total_cpu_pct_per_window": [round(t, 2) for t in totals],
        "total_wakeups_per_s": round(statistics.median(wakeups), 1),
        "per_service": per_service,
        "goal_pct": goal_pct,
        "goal_met": total < goal_pct,
    }
    if floor is not None:
        floor_total = floor * len(names)
        out["floor"] = {"cpu_pct_one_process": round(floor, 3),
                        "wakeups_per_s_one_process": round(med[FLOOR]["wakeups_per_s"], 1),
                        "cpu_pct_times_processes": round(floor_total, 2)}
        out["total_over_floor"] = round(total / floor_total, 1) if floor_total > 0 else None
    return out


def pod_pids(ready: dict[str, Any]) -> dict[str, int]:
    """The services' PIDs from the ready file, plus their common parent (the `xds up` process)."""
    pids = {n: int(p) for n, p in ready["pids"].items()}
    parents = set()
    for pid in pids.values():
        try:
            parents.add(parse_stat(Path(f"/proc/{pid}/stat").read_text())[3])
        except FileNotFoundError:
            raise ProcessLookupError(f"service pid {pid} is gone: is the pod up?") from None
    if len(parents) == 1 and (ppid := parents.pop()) > 1:
        pids[SUPERVISOR] = ppid
    return pids


def measure(pids: dict[str, int], seconds: float, repeat: int) -> list[dict[str, dict[str, float]]]:
    floor = subprocess.Popen([sys.executable, "-c", _FLOOR_CODE, str(seconds * repeat + 60)],
                             stdout=subprocess.PIPE, text=True)
    try:
        if floor.stdout is None or floor.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor process did not start")
        procs = {**pids, FLOOR: floor.pid}
        windows = []
        before = {n: sample(p) for n, p in procs.items()}
        t0 = time.monotonic()
        for _ in range(repeat):
            time.sleep(seconds)   # the measurement window itself (this is a benchmark, not a test)
            after = {n: sample(p) for n, p in procs.items()}
            t1 = time.monotonic()
            windows.append(window(before, after, t1 - t0))
            before, t0 = after, t1
        return windows
    finally:
        floor.kill()
        floor.wait()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-file", required=True, help="the ready file written by `xds up --ready-file`")
    p.add_argument("--seconds", type=float, default=10.0, help="length of one window")
    p.add_argument("--repeat", type=int, default=1, help="windows back to back; figures are medians")
    p.add_argument("--goal-pct", type=float, default=GOAL_PCT, help="the pod's total must stay below this")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.seconds <= 0 or args.repeat < 1:
        print("bench idle: --seconds must be > 0 and --repeat >= 1", file=sys.stderr)
        return 2
    try:
        ready = json.loads(Path(args.ready_file).read_text())
    except (OSError, ValueError) as exc:
        print(f"bench idle: cannot read the ready file (is `xds up --ready-file` running?): {exc}", file=sys.stderr)
        return 2
    try:
        windows = measure(pod_pids(ready), args.seconds, args.repeat)
    except (ProcessLookupError, KeyError) as exc:
        print(f"bench idle: a pod process went away or restarted during the measurement: {exc}", file=sys.stderr)
        return 1
    result = summarise(windows, args.goal_pct)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, s in result["per_service"].items():
            print(f"{name:<16} {s['cpu_pct']:6.2f} %  {s['wakeups_per_s']:7.1f} wake-ups/s  {s['threads']:3d} threads")
        fl = result.get("floor", {})
        print(f"total {result['total_cpu_pct_of_one_core']:.2f} % of one core over {result['processes']} processes, "
              f"{result['total_wakeups_per_s']:.0f} wake-ups/s; floor (bare uvloop) "
              f"{fl.get('cpu_pct_one_process', 0):.3f} % a process, {fl.get('cpu_pct_times_processes', 0):.2f} % "
              f"for {result['processes']}; goal < {args.goal_pct:g} %: {'PASS' if result['goal_met'] else 'FAIL'}")
    return 0 if result["goal_met"] else 1
