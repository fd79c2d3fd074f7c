"""Max-min fair fluid sharing of links among transfers that are reserved together.

Pure and deterministic: flows are processed in list order, no sets are iterated.
A flow is (start, nbytes, link indices); ``cap`` maps a link index to bytes per second.
Between events (a flow starts or finishes) every active flow runs at its max-min fair
rate (progressive filling: the link with the smallest fair share fixes the rate of all
its unfrozen flows, which then leave the computation); at each event rates are recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_DONE_REL = 1e-9  # a flow with less than this fraction of its bytes left is done


def max_min_rates(active: Sequence[int], paths: Sequence[Sequence[int]],
                  cap: dict[int, float]) -> dict[int, float]:
    """Rates of the ``active`` flows (indices into ``paths``) under max-min fairness."""
    left: dict[int, float] = {}
    users: dict[int, list[int]] = {}
    for f in active:
        for link in paths[f]:
            if link not in left:
                left[link] = cap[link]
                users[link] = []
            users[link].append(f)
    count = {link: len(fs) for link, fs in users.items()}
    rate: dict[int, float] = {}
    while len(rate) < len(active):
        best_link, best_share = -1, math.inf
        for link, n in count.items():
            if n > 0:
                share = left[link] / n
                if share < best_share:
                    best_link, best_share = link, share
        for f in users[best_link]:
            if f in rate:
                continue
            rate[f] = best_share
            for link in paths[f]:
                left[link] = max(0.0, left[link] - best_share)
                count[link] -= 1
    return rate


def fluid_finish_times(starts: Sequence[float], sizes: Sequence[float],
                       paths: Sequence[Sequence[int]], cap: dict[int, float]) -> list[float]:
    """Finish time of each flow when all share links max-min fairly from their start on.

    Every path must be non-empty and every size positive (trivial flows are the caller's).
    """
    n = len(starts)
    finish = [math.nan] * n
    if n == 1:  # the common case: alone, at the bottleneck rate
        return [starts[0] + sizes[0] / min(cap[link] for link in paths[0])]
    remaining = list(sizes)
    pending = sorted(range(n), key=lambda f: (starts[f], f))
    active: list[int] = []
    t = starts[pending[0]]
    nxt = 0
    while nxt < n or active:
        while nxt < n and starts[pending[nxt]] <= t:
            active.append(pending[nxt])
            nxt += 1
        if not active:
            t = starts[pending[nxt]]
            continue
        rate = max_min_rates(active, paths, cap)
        dt = min(remaining[f] / rate[f] for f in active)
        if nxt < n:
            dt = min(dt, starts[pending[nxt]] - t)
        t += dt
        still: list[int] = []
        for f in active:
            remaining[f] -= rate[f] * dt
            if remaining[f] <= sizes[f] * _DONE_REL:
                finish[f] = t
            else:
                still.append(f)
        active = still
    return finish
