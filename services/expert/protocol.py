"""Expert instance RPC: statistics, so tests and operators see which sources it served."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.wire import message


@message("expert.StatsQuery")
@dataclass(frozen=True, slots=True)
class ExpertStatsQuery:
    pass


@message("expert.Stats")
@dataclass(frozen=True, slots=True)
class ExpertStats:
    name: str
    hosted: tuple[int, ...]               # routed expert ids held (primary or replica)
    events: int                           # A2E events answered
    rows: int                             # rows computed
    rejected: int                         # notices refused (peer violations, stale)
    sources: tuple[str, ...]              # attention ranks, in dispatch source order
    events_per_source: tuple[int, ...]
    rows_per_source: tuple[int, ...]
