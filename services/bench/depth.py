"""TTFT against queue depth (pure): how long a request waited for its first token, by how many
requests were ahead of it when it arrived (started before it, no first token yet). In a FCFS
pod with a fixed service rate TTFT grows linearly with that depth; batching and chunked
prefill make the slope smaller."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

EDGES = (0, 1, 4, 16, 64, 256, 1024)   # bucket lower bounds: 0, 1-3, 4-15, 16-63, 64-255, 256-1023, 1024+


def depths(spans: Sequence[tuple[float, float]]) -> list[int]:
    """For each (start, first_token) span: the requests started earlier (or at the same time,
    listed before it) whose first token came after this one's start."""
    out = []
    for i, (start, _) in enumerate(spans):
        out.append(sum(1 for j, (s, f) in enumerate(spans) if j != i and (s < start or (s == start and j < i))
                       and f > start))
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ttft_by_depth(spans: Sequence[tuple[float, float]]) -> list[dict]:
    """Buckets of queue depth at arrival, each with its count and TTFT p50/p99 in ms."""
    buckets: dict[int, list[float]] = {}
    for (start, first), d in zip(spans, depths(spans)):
        lo = EDGES[bisect.bisect_right(EDGES, d) - 1]
        buckets.setdefault(lo, []).append((first - start) * 1e3)
    out = []
    for lo in sorted(buckets):
        hi = EDGES[EDGES.index(lo) + 1] - 1 if lo != EDGES[-1] else None
        xs = buckets[lo]
        out.append({"depth": f"{lo}-{hi}" if hi is not None and hi != lo else (f"{lo}+" if hi is None else str(lo)),
                    "requests": len(xs), "ttft_ms_p50": _pct(xs, 50), "ttft_ms_p99": _pct(xs, 99)})
    return out
