"""Which replica serves each routed expert for one source: latency- and load-aware. Pure.

A source with a chooser posts only to the ranks its plan gives rows (a slow rank with no rows
then costs the layer nothing), and to every live rank at every ``explore_every``-th plan (empty
blocks too), so it hears every rank's answer latency now and then; ``observe`` keeps an EWMA
of it per rank.

By default (``ChoiceConfig.pack``) ``choose`` serves the plan from as few live ranks as hold
its experts (greedy set cover), because a block costs a put, a doorbell, a wake-up and an
answer whatever its size: with round-robin placement and 2 replicas two ranks hold every
expert, so a source posts 2 blocks a layer instead of 4. Ties rotate with the source's
``prefer`` offset and the plan count, so the sources spread over the ranks and every live rank
keeps getting blocks. A slow rank (costlier than the fastest live one by both margins below)
is used only for an expert nobody else live holds. Without ``pack``, ``choose`` assigns each
needed expert, in expert-id order, to the live holder of least cost::

    cost(r) = ewma_s(r) * (1 + load_weight * rows already given to r in this plan / rows in the plan)

and keeps the first live holder (the primary) unless another holder is cheaper by more than
``margin_s`` and ``margin_frac`` of the primary's cost, so timer noise on a loaded host never
moves rows around, while a straggler (e.g. +20 ms per block) loses its rows at once. Ties go
to the holder listed first. A rank never heard from costs the mean of the ranks that were
(nothing known: no preference).

Why this never changes a token: which replica computes a row, and in which attempt, is
bitwise irrelevant (``dispatch_core.LayerAttempts``: each row is computed on its own, the
combine runs in slot order). Only timing depends on the choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from xccl_net.dispatch_core import NoLiveReplica, Placement


@dataclass(frozen=True, slots=True)
class ChoiceConfig:
    alpha: float = 0.2            # EWMA weight of the newest answer
    load_weight: float = 1.0      # how much the rows already given to a rank in this plan cost
    margin_s: float = 0.005       # leave the primary only for a replica cheaper by this much ...
    margin_frac: float = 0.3      # ... and by this fraction of the primary's cost
    explore_every: int = 16       # every n-th plan posts to every live rank (empty blocks too)
    # Serve the plan from as few ranks as cover its experts (``pack``) instead of spreading rows:
    # a block costs a put, a wake-up and an answer whatever its size (C = 8 on the 2-core
    # machine: 1.13x tokens/s, 0.83x CPU per token in alternating A/B runs).
    pack: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1 or self.explore_every < 1 or self.load_weight < 0 or self.margin_s < 0 or not 0 <= self.margin_frac < 1:
            raise ValueError(f"ChoiceConfig out of range: {self}")


class ReplicaChooser:
    def __init__(self, num_ranks: int, cfg: ChoiceConfig = ChoiceConfig(), *, prefer: int = 0) -> None:
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        self.cfg = cfg
        self.prefer = prefer % num_ranks   # pack: ties go to ranks from this one on (sources spread)
        self.ewma_s: list[float | None] = [None] * num_ranks
        self.moved = 0                # experts kept off a holder by its cost (a slow rank)
        self.plans = 0

    def explore(self) -> bool:
        """Called once per plan: whether this plan posts to every live rank, rows or not.

        Only ranks that get rows are posted to otherwise, so a slow rank stops costing the
        layer its answer time; every ``explore_every``-th plan still hears from every rank, so
        a straggler that recovered is seen to and wins its rows back."""
        self.plans += 1
        return self.plans % self.cfg.explore_every == 0

    def observe(self, rank: int, latency_s: float) -> None:
        """``rank`` answered a block ``latency_s`` after it was posted."""
        if latency_s < 0:
            raise ValueError(f"negative latency {latency_s} for rank {rank}")
        old = self.ewma_s[rank]
        self.ewma_s[rank] = latency_s if old is None else old + self.cfg.alpha * (latency_s - old)

    def forget(self, rank: int) -> None:
        """``rank`` came back (restarted, continued, path healed): what it did before says
        nothing of it now, so it starts unknown (no preference) instead of stale-slow."""
        self.ewma_s[rank] = None

    def latency_s(self, rank: int) -> float:
        known = [v for v in self.ewma_s if v is not None]
        v = self.ewma_s[rank]
        return v if v is not None else (sum(known) / len(known) if known else 0.0)

    def choose(self, placement: Placement, excluded: Iterable[int], rows_per_expert: Mapping[int, int]) -> np.ndarray:
        """Expert id -> serving rank for the experts in ``rows_per_expert`` (others -1).
        Raises ``NoLiveReplica`` naming an expert with no live holder."""
        ex = frozenset(excluded)
        if self.cfg.pack:
            return self._pack(placement, ex, rows_per_expert)
        out = np.full(placement.num_experts, -1, dtype=np.int64)
        total = max(1, sum(rows_per_expert.values()))
        given = [0] * placement.num_ranks
        c = self.cfg
        for e in sorted(rows_per_expert):
            hs = placement.holders[e]
            live = [r for r in hs if r not in ex]
            if not live:
                raise NoLiveReplica(e, hs)

            def cost(r: int) -> float:
                return self.latency_s(r) * (1 + c.load_weight * given[r] / total)

            best = live[0]
            others = sorted(live[1:], key=lambda r: (cost(r), live.index(r)))
            if others:
                cand, base = others[0], cost(live[0])
                if cost(cand) < base - c.margin_s and cost(cand) < base * (1 - c.margin_frac):
                    best = cand
                    self.moved += 1
            out[e] = best
            given[best] += rows_per_expert[e]
        return out

    def _pack(self, placement: Placement, ex: frozenset[int], rows_per_expert: Mapping[int, int]) -> np.ndarray:
        """The experts of the plan from as few live ranks as hold them: a greedy set cover (the
        rank holding most of the experts still unassigned next) started from each live rank in
        turn, the smallest cover kept; among covers as small, the one started nearest after
        ``prefer`` + the plan count, so sources with different ``prefer`` spread over the ranks
        and every rank keeps getting blocks. A slow rank (costlier than the fastest live one by
        both margins) serves only an expert no other live rank holds, as in ``choose``."""
        out = np.full(placement.num_experts, -1, dtype=np.int64)
        n = placement.num_ranks
        live = [r for r in range(n) if r not in ex]
        fastest = min((self.latency_s(r) for r in live), default=0.0)
        c = self.cfg
        slow = {r for r in live
                if self.latency_s(r) > fastest + c.margin_s and self.latency_s(r) * (1 - c.margin_frac) > fastest}
        need = set(rows_per_expert)
        # expert -> the ranks that may serve it: live and not slow, else any live holder.
        may: dict[int, list[int]] = {}
        for e in sorted(need):
            hs = [r for r in placement.holders[e] if r not in ex]
            if not hs:
                raise NoLiveReplica(e, placement.holders[e])
            may[e] = [r for r in hs if r not in slow] or hs
        serves: dict[int, set[int]] = {r: set() for r in live}   # rank -> needed experts it may serve
        for e, rs in may.items():
            for r in rs:
                serves[r].add(e)
        start0 = (self.prefer + self.plans) % n
        best: list[tuple[int, set[int]]] | None = None
        for k in range(n):
            first = (start0 + k) % n
            if not serves.get(first):
                continue
            left, cover = set(need), []
            r = first
            while True:
                got = serves[r] & left
                cover.append((r, got))
                left -= got
                if not left:
                    break
                r = min(live, key=lambda q: (-len(serves[q] & left), (q - first) % n))
            if best is None or len(cover) < len(best):
                best = cover
        for r, experts in best or []:
            for e in experts:
                out[e] = r
                if any(h in slow for h in placement.holders[e]) and r not in slow:
                    self.moved += 1   # a slow live holder was passed over: moved by cost
        return out
