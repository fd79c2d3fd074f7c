"""Dispatch/combine over real XCCL endpoints (mem and shm): 2 attention ranks, 4 expert ranks in
one event loop; results must be bitwise the direct computation; failures are typed and bounded;
sources (DP groups) are served independently, each with its own event numbering."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import asynccontextmanager

import numpy as np
import pytest

from xccl_net.dispatch import A2EDispatcher, E2AHandler
from xccl_net.dispatch_core import (
    DTYPE,
    BlockMeta,
    DispatchCapacityError,
    DispatchLayout,
    Placement,
    encode_meta,
    pack_event_id,
    reference_moe,
)
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.errors import CorruptMetadata, EventIdMismatch, PeerUnreachable, XcclTimeout

M, N, K, TOKENS, HIDDEN, EXPERTS = 2, 4, 3, 24, 32, 8
ATTN = [f"attn{s}" for s in range(M)]
EXP = [f"exp{r}" for r in range(N)]
LAYOUT = DispatchLayout(num_sources=M, num_ranks=N, capacity_rows=TOKENS * K, hidden=HIDDEN)
PLACEMENT = Placement.round_robin(EXPERTS, N)

pytestmark = pytest.mark.integration


def expert_weights(seed: int = 3):
    rng = np.random.default_rng(seed)
    ws = rng.standard_normal((EXPERTS, HIDDEN, HIDDEN)).astype(DTYPE) / np.float32(np.sqrt(HIDDEN))

    def expert_fn(e: int, rows: np.ndarray) -> np.ndarray:
        return np.tanh(rows @ ws[e]) * np.float32(e + 1)

    return expert_fn


EXPERT_FN = expert_weights()


def gates(seed: int, tokens: int = TOKENS):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((tokens, HIDDEN)).astype(DTYPE) for _ in range(M)]
    ids = [np.stack([rng.choice(EXPERTS, K, replace=False) for _ in range(tokens)]).reshape(tokens, K)
           for _ in range(M)]
    ws = [rng.random((tokens, K)).astype(DTYPE) for _ in range(M)]
    return xs, ids, ws


def shm_entries(namespace: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if namespace in f]


@asynccontextmanager
async def pod(kind: str, tmp_path):
    """M attention + N expert endpoints; everything closed (and unlinked) on exit."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    hub = None
    if kind == "mem":
        from xccl_net.mem import MemoryHub
        hub = MemoryHub()
    eps = {}
    try:
        for s, name in enumerate(ATTN):
            eps[name] = await open_endpoint(EndpointConfig(
                name=name, namespace=namespace, kind=kind, npu=s, ring_slots=4, slot_bytes=4096,
                windows={"e2a": LAYOUT.e2a_window_bytes}), hub=hub)
        for r, name in enumerate(EXP):
            eps[name] = await open_endpoint(EndpointConfig(
                name=name, namespace=namespace, kind=kind, npu=M + r, ring_slots=4, slot_bytes=4096,
                windows={"a2e": LAYOUT.a2e_window_bytes}), hub=hub)
        yield eps, namespace
    finally:
        for ep in eps.values():
            await ep.close()
    assert shm_entries(namespace) == []


def make_sides(eps):
    ds = [A2EDispatcher(eps[ATTN[s]], source=s, expert_peers=EXP, placement=PLACEMENT, layout=LAYOUT)
          for s in range(M)]
    hs = [E2AHandler(eps[EXP[r]], rank=r, source_peers=ATTN, placement=PLACEMENT, layout=LAYOUT)
          for r in range(N)]
    return ds, hs


async def serve_n(h, n, timeout_s=5.0):
    return [await h.serve_event(EXPERT_FN, timeout_s=timeout_s) for _ in range(n)]


async def run_event(ds, hs, event_id, xs, ids, ws, *, serving=None, timeout_s=5.0):
    """Every source runs ``event_id``; every serving rank answers each source once."""
    serving = range(N) if serving is None else serving
    async with asyncio.TaskGroup() as tg:
        served = [tg.create_task(serve_n(hs[r], len(ds), timeout_s)) for r in serving]
        outs = [tg.create_task(d.run_layer(event_id, xs[s], ids[s], ws[s], timeout_s=timeout_s))
                for s, d in enumerate(ds)]
    for t in served:
        assert sorted((v.source, v.event_id) for v in t.result()) == [(s, event_id) for s in range(len(ds))]
    return [t.result() for t in outs]


def assert_bitwise(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == DTYPE
        assert g.tobytes() == w.tobytes()


KINDS = ["mem", "shm"]


def invariant_expert_fn(calls: list[tuple[int, int]]):
    """Experts whose rows are computed each on its own (``layers.linear``), recording each call."""
    from services.model.layers import linear

    ws = np.random.default_rng(5).standard_normal((EXPERTS, HIDDEN, HIDDEN)).astype(DTYPE) / np.float32(np.sqrt(HIDDEN))

    def expert_fn(e: int, rows: np.ndarray) -> np.ndarray:
        calls.append((e, rows.shape[0]))
        return np.tanh(linear(rows, ws[e])) * np.float32(e + 1)

    return expert_fn


@pytest.mark.parametrize("kind", KINDS)
async def test_blocks_of_one_layer_from_both_sources_run_each_expert_once_bitwise(kind, tmp_path):
    """Both DP groups' blocks of one layer wait at every expert rank: one ``serve_events`` per
    rank serves both, each expert runs once on the rows of both (the calls are counted), the
    answers are bitwise the direct computation; a layer of another step, waiting alongside, is
    served in the same call but computed on its own."""
    async with pod(kind, tmp_path) as (eps, _):
        ds, hs = make_sides(eps)
        calls: list[tuple[int, int]] = []
        fn = invariant_expert_fn(calls)
        xs, ids, ws = gates(60)
        eid = pack_event_id(2, 0)
        pending = [await d.start_layer(eid, xs[s], ids[s], timeout_s=5.0) for s, d in enumerate(ds)]
        served = [await h.serve_events(select=lambda _e: fn, timeout_s=5.0) for h in hs]
        assert [sorted((v.source, v.event_id) for v in got) for got in served] == [[(0, eid), (1, eid)]] * N
        serving = list(calls)
        got = [await d.finish_layer(p, ws[s]) for s, (d, p) in enumerate(zip(ds, pending))]
        assert_bitwise(got, reference_moe(xs, ids, ws, fn))
        # Every expert some row chose ran once (its primary rank serves both sources), on the rows of both.
        chosen = {int(e) for s in range(M) for e in np.unique(ids[s])}
        assert sorted(e for e, _ in serving) == sorted(chosen), serving
        assert sum(n for _, n in serving) == M * TOKENS * K
        assert any(n > int((ids[0] == e).sum()) and n > int((ids[1] == e).sum()) for e, n in serving)
        # Two layers waiting together (source 0 at layer 1, source 1 at layer 3): one call, two groups.
        calls.clear()
        xs, ids, ws = gates(61)
        e0, e1 = pack_event_id(1, 1), pack_event_id(3, 1)
        p0 = await ds[0].start_layer(e0, xs[0], ids[0], timeout_s=5.0)
        p1 = await ds[1].start_layer(e1, xs[1], ids[1], timeout_s=5.0)
        served = [await h.serve_events(select=lambda _e: fn, timeout_s=5.0) for h in hs]
        assert [sorted((v.source, v.event_id) for v in got) for got in served] == [[(0, e0), (1, e1)]] * N
        got = [await ds[0].finish_layer(p0, ws[0]), await ds[1].finish_layer(p1, ws[1])]
        assert_bitwise(got, reference_moe(xs, ids, ws, fn))
        assert hs[0].per_source[0][0] == 2 and hs[0].per_source[1][0] == 2
        # A bad notice among good ones costs only itself: rejected (and refused: its source is known).
        xs, ids, ws = gates(62)
        eid = pack_event_id(2, 2)
        pending = [await d.start_layer(eid, xs[s], ids[s], timeout_s=5.0) for s, d in enumerate(ds)]
        await eps[ATTN[1]].put(EXP[0], "a2e", LAYOUT.a2e_offset(1), b"", notify=encode_meta(BlockMeta(
            event_id=pack_event_id(2, 1), sender=1, offset=LAYOUT.a2e_offset(1), count=0,
            expert_ids=np.empty(0, np.int32))))   # older than what source 1 just sent: stale
        await eps[ATTN[1]].put(EXP[0], "a2e", 0, b"", notify=b"\x00garbage")
        served = [await h.serve_events(select=lambda _e: fn, timeout_s=5.0) for h in hs]
        assert [sorted((v.source, v.event_id) for v in got) for got in served] == [[(0, eid), (1, eid)]] * N
        assert hs[0].stats["rejected_notices"] == 2 and hs[0].stats["refusals_sent"] == 1
        got = [await d.finish_layer(p, ws[s]) for s, (d, p) in enumerate(zip(ds, pending))]
        assert_bitwise(got, reference_moe(xs, ids, ws, fn))


@pytest.mark.parametrize("kind", KINDS)
async def test_layers_equal_direct_computation_with_replicas_and_empty_sources(kind, tmp_path):
    async with pod(kind, tmp_path) as (eps, _):
        ds, hs = make_sides(eps)
        for step in range(3):
            xs, ids, ws = gates(step)
            got = await run_event(ds, hs, pack_event_id(1, step), xs, ids, ws)
            assert_bitwise(got, reference_moe(xs, ids, ws, EXPERT_FN))
        # Rank 2 excluded everywhere: its experts are served by their replicas on rank 3.
        for d in ds:
            d.exclude(2)
        xs, ids, ws = gates(10)
        got = await run_event(ds, hs, pack_event_id(1, 3), xs, ids, ws, serving=[0, 1, 3])
        assert_bitwise(got, reference_moe(xs, ids, ws, EXPERT_FN))
        assert hs[3].stats["rows_served"] > 0
        for d in ds:
            d.include(2)
        # A source with no tokens still posts (count 0) to every rank, and gets back zero rows.
        xs, ids, ws = gates(11)
        xs[1], ids[1], ws[1] = xs[1][:0], ids[1][:0], ws[1][:0]
        got = await run_event(ds, hs, pack_event_id(1, 4), xs, ids, ws)
        assert got[1].shape == (0, HIDDEN)
        assert_bitwise(got, reference_moe(xs, ids, ws, EXPERT_FN))


@pytest.mark.parametrize("kind", KINDS)
async def test_dead_expert_rank_fails_within_timeout(kind, tmp_path):
    async with pod(kind, tmp_path) as (eps, _):
        ds, hs = make_sides(eps)
        xs, ids, ws = gates(1)
        await eps[EXP[1]].close()
        t0 = time.monotonic()
        with pytest.raises((PeerUnreachable, XcclTimeout)):
            await ds[0].run_layer(pack_event_id(0, 0), xs[0], ids[0], ws[0], timeout_s=1.0)
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("kind", KINDS)
async def test_expert_alive_but_silent_is_a_timeout_naming_it(kind, tmp_path):
    async with pod(kind, tmp_path) as (eps, _):
        ds, hs = make_sides(eps)
        xs, ids, ws = gates(2)
        t0 = time.monotonic()
        with pytest.raises(XcclTimeout, match=r"\[0, 1, 2, 3\]"):
            await ds[0].run_layer(pack_event_id(0, 0), xs[0], ids[0], ws[0], timeout_s=0.5)
        assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("kind", KINDS)
async def test_sources_are_served_independently_at_their_own_pace(kind, tmp_path):
    """Source 0 runs five layers while source 1 posts nothing, then source 1 starts at its own
    step 0 (smaller ids than source 0's): nobody waits for the other, results stay exact."""
    async with pod(kind, tmp_path) as (eps, _):
        ds, hs = make_sides(eps)
        for step in range(5):
            xs, ids, ws = gates(20 + step)
            async with asyncio.TaskGroup() as tg:
                served = [tg.create_task(h.serve_event(EXPERT_FN, timeout_s=5.0)) for h in hs]
                got = await ds[0].run_layer(pack_event_id(1, 7 + step), xs[0], ids[0], ws[0], timeout_s=5.0)
            assert {(t.result().source, t.result().event_id) for t in served} == {(0, pack_event_id(1, 7 + step))}
            assert_bitwise([got], reference_moe(xs[:1], ids[:1], ws[:1], EXPERT_FN))
        for step in range(2):
            xs, ids, ws = gates(40 + step)
            async with asyncio.TaskGroup() as tg:
                for h in hs:
                    tg.create_task(h.serve_event(EXPERT_FN, timeout_s=5.0))
                got = await ds[1].run_layer(pack_event_id(1, step), xs[1], ids[1], ws[1], timeout_s=5.0)
            assert_bitwise([got], reference_moe(xs[1:], ids[1:], ws[1:], EXPERT_FN))
        assert [h.per_source[0][0] for h in hs] == [5] * N and [h.per_source[1][0] for h in hs] == [2] * N
        # Interleaved: source 1 steps twice while source 0 is on one step (its layer still pending).
        xs, ids, ws = gates(50)
        layer0 = asyncio.create_task(ds[0].run_layer(pack_event_id(1, 12), xs[0], ids[0], ws[0], timeout_s=5.0))
        servers = [asyncio.create_task(serve_n(h, 3)) for h in hs]
        for step in (2, 3):
            got1 = await ds[1].run_layer(pack_event_id(1, step), xs[1], ids[1], ws[1], timeout_s=5.0)
            assert_bitwise([got1], reference_moe(xs[1:], ids[1:], ws[1:], EXPERT_FN))
        assert_bitwise([await layer0], reference_moe(xs[:1], ids[:1], ws[:1], EXPERT_FN))
        for t in servers:
            await t


@pytest.mark.parametrize("kind", ["mem"])
async def test_bad_notify_is_rejected_and_the_expert_stays_up(kind, tmp_path):
    async with pod(kind, tmp_path) as (eps, _):
        ds, hs = make_sides(eps)
        rogue = eps[ATTN[1]]
        await rogue.put(EXP[0], "a2e", 0, b"", notify=b"\x00garbage")
        with pytest.raises(CorruptMetadata):
            await hs[0].serve_event(EXPERT_FN, timeout_s=1.0)
        # Claims to be source 0 while being attn1.
        await rogue.put(EXP[0], "a2e", 0, b"", notify=encode_meta(
            BlockMeta(event_id=9, sender=0, offset=0, count=0, expert_ids=np.empty(0, np.int32))))
        with pytest.raises(CorruptMetadata, match="claims to be source 0"):
            await hs[0].serve_event(EXPERT_FN, timeout_s=1.0)
        assert hs[0].stats["rejected_notices"] == 2
        xs, ids, ws = gates(4)
        got = await run_event(ds, hs, pack_event_id(2, 0), xs, ids, ws)
        assert_bitwise(got, reference_moe(xs, ids, ws, EXPERT_FN))
        # Replaying an already served event id is stale: EventIdMismatch, and the expert stays up.
        await rogue.put(EXP[0], "a2e", LAYOUT.a2e_offset(1), b"", notify=encode_meta(BlockMeta(
            event_id=pack_event_id(2, 0), sender=1, offset=LAYOUT.a2e_offset(1), count=0,
            expert_ids=np.empty(0, np.int32))))
        with pytest.raises(EventIdMismatch):
            await hs[0].serve_event(EXPERT_FN, timeout_s=1.0)
        xs, ids, ws = gates(5)
        got = await run_event(ds, hs, pack_event_id(2, 1), xs, ids, ws)
        assert_bitwise(got, reference_moe(xs, ids, ws, EXPERT_FN))


@pytest.mark.parametrize("kind", KINDS)
async def test_abandoned_attempt_is_dropped_and_retry_with_replica_succeeds(kind, tmp_path):
    """Rank 1 dies and rank 0 is slow: sources give up (timeout), exclude rank 1 and retry the
    layer with a fresh attempt id; rank 0's late answer to the abandoned attempt is dropped."""
    async with pod(kind, tmp_path) as (eps, _):
        ds, hs = make_sides(eps)
        xs, ids, ws = gates(6)
        first = pack_event_id(3, 0, attempt=0)
        fast = [asyncio.create_task(serve_n(hs[r], M)) for r in (2, 3)]
        tries = await asyncio.gather(*(d.run_layer(first, xs[s], ids[s], ws[s], timeout_s=0.5)
                                       for s, d in enumerate(ds)), return_exceptions=True)
        assert all(isinstance(t, XcclTimeout) for t in tries), tries
        for f in fast:
            assert sorted((v.source, v.event_id) for v in await f) == [(0, first), (1, first)]
        late = await serve_n(hs[0], M)  # late answers to both sources
        assert sorted((v.source, v.event_id) for v in late) == [(0, first), (1, first)]
        await eps[EXP[1]].close()
        for d in ds:
            d.exclude(1)
        retry = pack_event_id(3, 0, attempt=1)
        got = await run_event(ds, hs, retry, xs, ids, ws, serving=[0, 2, 3])
        assert_bitwise(got, reference_moe(xs, ids, ws, EXPERT_FN))
        assert [d.stats["stale_notices"] for d in ds] == [1, 1]


async def test_capacity_overflow_raises_at_the_sender_before_any_put(tmp_path):
    async with pod("mem", tmp_path) as (eps, _):
        ds, _hs = make_sides(eps)
        ids = np.tile(np.array([[0, 4, 1]]), (TOKENS + 1, 1))  # experts 0 and 4 both on rank 0
        x = np.zeros((TOKENS + 1, HIDDEN), DTYPE)
        small = A2EDispatcher(eps[ATTN[0]], source=0, expert_peers=EXP, placement=PLACEMENT,
                              layout=DispatchLayout(M, N, capacity_rows=2 * TOKENS, hidden=HIDDEN))
        with pytest.raises(DispatchCapacityError):
            await small.run_layer(1, x, ids, np.ones(ids.shape, DTYPE), timeout_s=1.0)
        assert eps[ATTN[0]].stats["puts"] == 0
