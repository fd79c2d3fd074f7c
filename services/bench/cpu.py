"""CPU time of a local pod's processes, from /proc (``xds bench serve`` with ``--ready-file``).

On a machine with few cores the pod's throughput is bounded by the CPU it spends per token, not
by how its time is spent waiting; these counters say how much each role used during a run, how
many cores the pod kept busy, and the CPU per output token to compare with the reference engine's
(one process, measured with ``time.process_time`` in the same run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from services.bench.idle import parse_stat

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime of each live process (a service that is gone is left out)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            out[name] = parse_stat(Path(f"/proc/{pid}/stat").read_text())[0] / _TICK
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def role_of(name: str) -> str:
    return name.split("-", 1)[0]


def cpu_report(before: dict[str, float], after: dict[str, float], duration_s: float,
               output_tokens: int) -> dict[str, Any]:
    """Per-role CPU seconds of the processes seen at both ends, cores kept busy, ms per token."""
    used = {n: after[n] - before[n] for n in after if n in before and after[n] >= before[n]}
    total = sum(used.values())
    by_role: dict[str, float] = {}
    for n, s in used.items():
        by_role[role_of(n)] = by_role.get(role_of(n), 0.0) + s
    return {"cpu_s": total, "cores_busy": total / duration_s if duration_s > 0 else 0.0,
            "cpu_ms_per_output_token": 1e3 * total / output_tokens if output_tokens else None,
            "cpu_s_by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1]))}
