"""Dispatch failover over real XCCL endpoints (mem and shm) in one event loop: a dead, a silent
(hung) or a refusing expert rank costs a re-dispatch inside the same layer, results stay
bitwise the direct computation; with both holders of an expert out the layer waits for one,
then fails with ``ExpertUnavailable`` naming it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.integration.test_dispatch import ATTN, EXP, EXPERT_FN, LAYOUT, PLACEMENT, assert_bitwise, gates, pod
from xccl_net.dispatch import A2EDispatcher, E2AHandler, Failover
from xccl_net.dispatch_core import pack_event_id, reference_moe, unpack_event_id
from xccl_net.dispatch_health import RankState
from xccl_net.errors import CorruptMetadata, ExpertUnavailable, ProtocolError, XcclTimeout

pytestmark = pytest.mark.integration
KINDS = ["mem", "shm"]
FAST = Failover(answer_timeout_s=0.3, wait_s=0.5)


class Rank:
    """An expert rank serving in a loop; ``gate`` cleared = hung (takes no notice)."""

    def __init__(self, h: E2AHandler, select=None) -> None:
        self.h, self.gate, self.select = h, asyncio.Event(), select
        self.parked = asyncio.Event()   # set while it waits at the cleared gate
        self.gate.set()
        self.served: list[int] = []
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        while True:
            if not self.gate.is_set():
                self.parked.set()
                await self.gate.wait()
                self.parked.clear()
            try:
                if self.select is not None:
                    s = await self.h.serve_event(select=self.select, timeout_s=0.05)
                else:
                    s = await self.h.serve_event(EXPERT_FN, timeout_s=0.05)
                self.served.append(s.event_id)
            except (XcclTimeout, ProtocolError):
                continue


@contextlib.asynccontextmanager
async def sides(kind, tmp_path, select=None):
    async with pod(kind, tmp_path) as (eps, _):
        d = A2EDispatcher(eps[ATTN[0]], source=0, expert_peers=EXP, placement=PLACEMENT, layout=LAYOUT,
                          failover=FAST)
        ranks = [Rank(E2AHandler(eps[EXP[r]], rank=r, source_peers=ATTN, placement=PLACEMENT, layout=LAYOUT),
                      select if r == 0 else None) for r in range(len(EXP))]
        try:
            yield d, ranks, eps
        finally:
            for r in ranks:
                r.task.cancel()
            await asyncio.gather(*(r.task for r in ranks), return_exceptions=True)


async def layer(d, seed, step, timeout_s=5.0):
    xs, ids, ws = gates(seed)
    got = await d.run_layer(pack_event_id(1, step), xs[0], ids[0], ws[0], timeout_s=timeout_s)
    assert_bitwise([got], reference_moe(xs[:1], ids[:1], ws[:1], EXPERT_FN))


@pytest.mark.parametrize("kind", KINDS)
async def test_dead_rank_is_replaced_by_its_replica_within_the_layer(kind, tmp_path):
    async with sides(kind, tmp_path) as (d, ranks, eps):
        await layer(d, 1, 0)
        ranks[1].task.cancel()
        await eps[EXP[1]].close()
        t0 = time.monotonic()
        await layer(d, 2, 1)
        assert time.monotonic() - t0 < FAST.answer_timeout_s + 1.0
        assert d.health.state(1) is RankState.OUT and d.stats["retries"] == 1
        await layer(d, 3, 2)                       # excluded now: no retry needed
        assert d.stats["retries"] == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_hung_rank_times_out_its_late_answers_are_dropped_and_it_comes_back(kind, tmp_path):
    async with sides(kind, tmp_path) as (d, ranks, _):
        d.beat(2, "epoch", 1)
        await layer(d, 4, 0)
        ranks[2].gate.clear()                      # hung: its puts land, nobody answers
        await ranks[2].parked.wait()
        await layer(d, 5, 1)
        assert d.health.state(2) is RankState.OUT and d.stats["retries"] == 1
        d.beat(2, "epoch", 1)                      # a beat from before the hang proves nothing
        assert d.health.state(2) is RankState.OUT
        ranks[2].gate.set()                        # continued: answers the abandoned attempt first
        d.beat(2, "epoch", 2)
        assert d.health.state(2) is RankState.IN
        for step in range(2, 5):
            await layer(d, 10 + step, step)
        assert d.stats["stale_notices"] >= 1
        assert unpack_event_id(ranks[2].served[-1]) == (1, 4, 0), "the continued rank serves again"


@pytest.mark.parametrize("kind", ["mem"])
async def test_refusing_rank_answers_typed_and_its_rows_go_to_the_replica(kind, tmp_path):
    def refuse(event_id):
        raise CorruptMetadata(f"cannot serve event {event_id}")

    async with sides(kind, tmp_path, select=refuse) as (d, ranks, _):
        t0 = time.monotonic()
        await layer(d, 6, 0)
        assert time.monotonic() - t0 < FAST.answer_timeout_s, "a refusal must not wait for the deadline"
        assert d.stats["refusals"] == 1 and ranks[0].h.stats["refusals_sent"] == 1
        assert "cannot serve" in d.health.why(0)


@pytest.mark.parametrize("kind", ["mem"])
async def test_no_live_replica_waits_then_fails_naming_the_expert_and_recovers(kind, tmp_path):
    async with sides(kind, tmp_path) as (d, ranks, _):
        xs, ids, ws = gates(7)
        e = int(ids[0][0, 0])
        holders = PLACEMENT.holders[e]
        for r in holders:
            d.silent(r, "test: dead")
        t0 = time.monotonic()
        with pytest.raises(ExpertUnavailable, match=r"routed expert \d+ \(held by exp\d, exp\d\)") as info:
            await d.run_layer(pack_event_id(1, 0), xs[0], ids[0], ws[0])
        assert time.monotonic() - t0 >= FAST.wait_s and info.value.expert_id in set(ids[0].reshape(-1).tolist())
        # One holder comes back while a layer waits: the layer goes on, exact.
        waiting = asyncio.create_task(d.run_layer(pack_event_id(1, 1), xs[0], ids[0], ws[0]))
        await asyncio.sleep(0)                     # one yield: it plans, finds no holder, waits
        assert d.stats["replica_waits"] == 2
        for r in holders:
            d.beat(r, "restarted", 1)
        got = await waiting
        assert_bitwise([got], reference_moe(xs[:1], ids[:1], ws[:1], EXPERT_FN))
