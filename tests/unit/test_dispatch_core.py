"""Pure dispatch/combine core: plan -> simulated transfer through plain byte buffers -> experts
-> combine must equal the direct computation bitwise, for any placement and exclusion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xccl_net.dispatch_core import (
    DTYPE,
    BlockMeta,
    CombineCollector,
    DispatchCapacityError,
    DispatchLayout,
    NoLiveReplica,
    Placement,
    SourceGuard,
    a2e_meta,
    combine,
    e2a_meta,
    pack_event_id,
    pack_rows,
    plan_dispatch,
    reference_moe,
    run_block,
    unpack_event_id,
    weighted_sum,
)
from xccl_net.errors import CorruptMetadata, EventIdMismatch, PeerUnreachable, ProtocolError, WindowError


def make_experts(num_experts: int, hidden: int, seed: int = 7):
    """A tiny FFN per expert: tanh(x @ W_e) + b_e. Matmul so row grouping could matter."""
    rng = np.random.default_rng(seed)
    ws = rng.standard_normal((num_experts, hidden, hidden)).astype(DTYPE) / np.float32(np.sqrt(hidden))
    bs = rng.standard_normal((num_experts, hidden)).astype(DTYPE)

    def expert_fn(e: int, rows: np.ndarray) -> np.ndarray:
        assert rows.dtype == DTYPE and rows.ndim == 2
        return np.tanh(rows @ ws[e]) + bs[e]

    return expert_fn


def make_gates(rng, tokens: int, k: int, num_experts: int, hidden: int):
    x = rng.standard_normal((tokens, hidden)).astype(DTYPE)
    ids = np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(tokens)]) if tokens else \
        np.empty((0, k), dtype=np.int64)
    w = rng.random((tokens, k)).astype(DTYPE)
    return x, ids.reshape(tokens, k), w


def simulate_layer(event_id, xs, ids, ws, placement, layout, expert_fn, excluded=()):
    """The whole A2E/E2A exchange with windows as plain byte buffers and notifies as lists."""
    m, n = layout.num_sources, layout.num_ranks
    a2e = {r: bytearray(layout.a2e_window_bytes) for r in range(n)}
    e2a = {s: bytearray(layout.e2a_window_bytes) for s in range(m)}
    a2e_notes = {r: [] for r in range(n)}
    e2a_notes = {s: [] for s in range(m)}
    plans = []
    for s in range(m):
        plan = plan_dispatch(event_id, s, ids[s], placement, layout, excluded)
        plans.append(plan)
        for r in plan.ranks:
            data = pack_rows(xs[s], plan, r).tobytes()
            meta = a2e_meta(plan, r, layout)
            a2e[r][meta.offset:meta.offset + len(data)] = data
            a2e_notes[r].append((meta, len(data)))
    for r in range(n):
        if r in excluded:
            assert a2e_notes[r] == []
            continue
        guard = SourceGuard(layout, placement.hosted(r))
        # Sources are served one by one as their blocks arrive, in any order: reverse them.
        for meta, nbytes in reversed(a2e_notes[r]):
            guard.accept(meta, nbytes)
            buf = np.frombuffer(a2e[r], dtype=DTYPE, count=meta.count * layout.hidden,
                                offset=meta.offset).reshape(meta.count, layout.hidden)
            y = run_block(buf, meta.expert_ids, expert_fn, layout.hidden)
            answer = e2a_meta(meta.event_id, r, y.shape[0], layout)
            data = y.tobytes()
            e2a[meta.sender][answer.offset:answer.offset + len(data)] = data
            e2a_notes[meta.sender].append((answer, len(data)))
    results = []
    for s in range(m):
        coll = CombineCollector(plans[s], layout)
        for meta, nbytes in e2a_notes[s]:
            coll.add(meta, nbytes)
        assert coll.done
        outs = {r: np.frombuffer(e2a[s], dtype=DTYPE, count=meta.count * layout.hidden,
                                 offset=meta.offset).reshape(meta.count, layout.hidden)
                for r, meta in coll.blocks.items()}
        results.append(combine(plans[s], outs, ws[s], layout.hidden))
    return results


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 3), n=st.integers(2, 5), k=st.integers(1, 4),
       tokens=st.integers(0, 40), hidden=st.sampled_from([1, 8, 24]), exclude=st.booleans())
def test_simulated_layer_equals_direct_computation_bitwise(seed, m, n, k, tokens, hidden, exclude):
    rng = np.random.default_rng(seed)
    num_experts = max(k, n + 1)
    placement = Placement.round_robin(num_experts, n, replicas=2)
    layout = DispatchLayout(num_sources=m, num_ranks=n, capacity_rows=tokens * k + 1, hidden=hidden)
    expert_fn = make_experts(num_experts, hidden, seed % 1000)
    gates = [make_gates(rng, tokens, k, num_experts, hidden) for _ in range(m)]
    xs, ids, ws = (list(v) for v in zip(*gates))
    excluded = {int(rng.integers(n))} if exclude else set()
    got = simulate_layer(pack_event_id(3, 11), xs, ids, ws, placement, layout, expert_fn, excluded)
    want = reference_moe(xs, ids, ws, expert_fn)
    for g, w in zip(got, want):
        assert g.dtype == DTYPE and g.shape == (tokens, hidden)
        assert g.tobytes() == w.tobytes()


def test_result_does_not_depend_on_which_replica_serves():
    rng = np.random.default_rng(1)
    m, n, k, tokens, hidden, num_experts = 2, 4, 3, 33, 16, 8
    placement = Placement.round_robin(num_experts, n)
    layout = DispatchLayout(m, n, tokens * k, hidden)
    expert_fn = make_experts(num_experts, hidden)
    xs, ids, ws = (list(v) for v in zip(*[make_gates(rng, tokens, k, num_experts, hidden) for _ in range(m)]))
    base = simulate_layer(1, xs, ids, ws, placement, layout, expert_fn)
    for dead in range(n):
        other = simulate_layer(1, xs, ids, ws, placement, layout, expert_fn, excluded={dead})
        assert all(a.tobytes() == b.tobytes() for a, b in zip(base, other))


def test_combine_adds_slots_in_order_like_a_scalar_loop():
    rng = np.random.default_rng(2)
    t, k, h = 9, 4, 5
    w = rng.random((t, k)).astype(DTYPE)
    y = (rng.standard_normal((t, k, h)) * 1e4).astype(DTYPE)
    got = weighted_sum(w, y)
    for i in range(t):
        for c in range(h):
            acc = np.float32(w[i, 0] * y[i, 0, c])
            for j in range(1, k):
                acc = np.float32(acc + np.float32(w[i, j] * y[i, j, c]))
            assert got[i, c] == acc


def test_placement_picks_primary_then_replica_deterministically():
    p = Placement.round_robin(6, 4)
    assert p.choose().tolist() == [0, 1, 2, 3, 0, 1]
    assert p.choose({1}).tolist() == [0, 2, 2, 3, 0, 2]
    assert p.hosted(0) == {0, 3, 4}
    with pytest.raises(NoLiveReplica) as exc:
        p.choose({1, 2})
    assert exc.value.expert_id == 1 and isinstance(exc.value, PeerUnreachable)
    with pytest.raises(ValueError):
        Placement(holders=((0, 0),), num_ranks=2)
    with pytest.raises(ValueError):
        Placement(holders=((5,),), num_ranks=2)


def test_plan_orders_rows_by_expert_then_token_and_skips_excluded_ranks():
    p = Placement.round_robin(4, 2)  # experts 0,2 -> rank 0; 1,3 -> rank 1
    layout = DispatchLayout(1, 2, 8, 4)
    ids = np.array([[2, 1], [0, 2], [3, 0]])
    plan = plan_dispatch(5, 0, ids, p, layout)
    assert plan.ranks == (0, 1)
    # flat rows: (0,0)=2 (0,1)=1 (1,0)=0 (1,1)=2 (2,0)=3 (2,1)=0
    assert plan.rows[0].tolist() == [2, 5, 0, 3]
    assert plan.experts[0].tolist() == [0, 0, 2, 2]
    assert plan.rows[1].tolist() == [1, 4]
    x = np.arange(12, dtype=DTYPE).reshape(3, 4)
    assert pack_rows(x, plan, 0)[:, 0].tolist() == [4.0, 8.0, 0.0, 4.0]
    plan = plan_dispatch(5, 0, ids, p, layout, excluded={1})
    assert plan.ranks == (0,) and plan.count(0) == 6


def test_zero_token_source_still_posts_every_rank():
    layout = DispatchLayout(2, 3, 4, 8)
    plan = plan_dispatch(9, 1, np.empty((0, 2), dtype=np.int64), Placement.round_robin(3, 3), layout)
    assert plan.ranks == (0, 1, 2)
    assert [a2e_meta(plan, r, layout).count for r in plan.ranks] == [0, 0, 0]
    assert pack_rows(np.empty((0, 8), DTYPE), plan, 2).shape == (0, 8)


def test_capacity_overflow_is_a_typed_error_at_the_sender():
    layout = DispatchLayout(1, 2, capacity_rows=3, hidden=4)
    ids = np.array([[0, 2], [0, 2]])  # four rows for rank 0
    with pytest.raises(DispatchCapacityError) as exc:
        plan_dispatch(1, 0, ids, Placement.round_robin(4, 2), layout)
    assert isinstance(exc.value, WindowError) and exc.value.rows == 4 and exc.value.capacity_rows == 3


def _meta(**kw):
    base = dict(event_id=7, sender=1, offset=DispatchLayout(2, 2, 4, 2).a2e_offset(1), count=2,
                expert_ids=np.array([0, 2], dtype=np.int32))
    base.update(kw)
    return BlockMeta(**base)


def test_source_guard_rejects_peer_violations_and_a_rejection_changes_nothing():
    layout = DispatchLayout(2, 2, 4, 2)
    hosted = frozenset({0, 2})

    def guard():
        g = SourceGuard(layout, hosted)
        g.accept(_meta(event_id=6))
        return g

    with pytest.raises(EventIdMismatch):
        guard().accept(_meta(event_id=6))  # replay of the last served event
    with pytest.raises(EventIdMismatch):
        guard().accept(_meta(event_id=5))  # late
    with pytest.raises(CorruptMetadata):
        guard().accept(_meta(offset=0))
    with pytest.raises(CorruptMetadata):
        guard().accept(_meta(count=5, expert_ids=np.zeros(5, np.int32)))
    with pytest.raises(CorruptMetadata):
        guard().accept(_meta(sender=2))
    with pytest.raises(CorruptMetadata):
        guard().accept(_meta(expert_ids=np.array([0, 1], np.int32)))  # expert 1 not hosted
    with pytest.raises(CorruptMetadata):
        guard().accept(_meta(expert_ids=np.array([2, 0], np.int32)))  # unsorted
    with pytest.raises(CorruptMetadata):
        guard().accept(_meta(expert_ids=np.array([0], np.int32)))
    with pytest.raises(CorruptMetadata):
        guard().accept(_meta(), nbytes=3)
    g = guard()
    for bad in (_meta(offset=0, event_id=9), _meta(event_id=9, expert_ids=np.array([0, 1], np.int32))):
        with pytest.raises(CorruptMetadata):
            g.accept(bad)
    assert g.last == {1: (0, 6)}  # the rejected notices left no trace: event 7 is still new
    g.accept(_meta(event_id=7))
    # Source 0 is independent: its own small ids are fresh although source 1 is at 7.
    g.accept(_meta(sender=0, offset=0, count=0, expert_ids=np.empty(0, np.int32), event_id=1), nbytes=0)
    assert g.last == {0: (0, 1), 1: (0, 7)}
    # A restarted source (bigger incarnation) starts afresh; an older incarnation is stale.
    g.accept(_meta(event_id=0, incarnation=5))
    with pytest.raises(EventIdMismatch):
        g.accept(_meta(event_id=100, incarnation=4))


@settings(max_examples=50, deadline=None)
@given(data=st.data(), m=st.integers(1, 4))
def test_sources_are_served_independently_in_any_interleaving(data, m):
    """Each source numbers its own events; any interleaving of sources is accepted, and within a
    source only increasing events are: the guard never waits for nor compares across sources."""
    layout = DispatchLayout(m, 1, 4, 2)
    g = SourceGuard(layout, frozenset({0}))
    steps = [data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=6, unique=True).map(sorted))
             for _ in range(m)]
    queues = [[pack_event_id(1, st_) for st_ in s] for s in steps]
    order = data.draw(st.permutations([s for s in range(m) for _ in queues[s]]))
    served = {s: [] for s in range(m)}
    for s in order:
        ev = queues[s].pop(0)
        meta = BlockMeta(event_id=ev, sender=s, offset=layout.a2e_offset(s), count=0,
                         expert_ids=np.empty(0, np.int32))
        g.accept(meta, 0)
        served[s].append(unpack_event_id(ev)[1])
        with pytest.raises(EventIdMismatch):
            g.accept(meta, 0)  # the same block again is a replay
    assert served == {s: steps[s] for s in range(m)}


def test_run_block_computes_each_expert_on_its_contiguous_run():
    calls = []

    def fn(e, rows):
        calls.append((e, rows[:, 0].tolist()))
        return rows * np.float32(e + 1)

    rows = np.arange(10, dtype=DTYPE).reshape(5, 2)
    out = run_block(rows, np.array([1, 1, 3, 6, 6], np.int32), fn, 2)
    assert calls == [(1, [0.0, 2.0]), (3, [4.0]), (6, [6.0, 8.0])]
    assert out[:, 0].tolist() == [0.0, 4.0, 16.0, 42.0, 56.0]
    assert run_block(rows[:0], np.empty(0, np.int32), fn, 2).shape == (0, 2)


def test_combine_collector_rejects_wrong_counts_and_strangers():
    layout = DispatchLayout(1, 3, 4, 2)
    plan = plan_dispatch(4, 0, np.array([[0], [1]]), Placement.round_robin(3, 3), layout, excluded={2})
    c = CombineCollector(plan, layout)
    with pytest.raises(EventIdMismatch):
        c.add(e2a_meta(5, 0, 1, layout))
    with pytest.raises(CorruptMetadata):
        c.add(e2a_meta(4, 0, 2, layout))
    with pytest.raises(ProtocolError):
        c.add(e2a_meta(4, 2, 0, layout))  # excluded rank answering
    assert not c.add(e2a_meta(4, 0, 1, layout))
    with pytest.raises(ProtocolError):
        c.add(e2a_meta(4, 0, 1, layout))
    assert c.missing() == [1]
    assert c.add(e2a_meta(4, 1, 1, layout))


def test_event_ids_increase_with_step_then_layer():
    ids = [pack_event_id(layer, step, a) for step in range(3) for layer in range(4) for a in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [unpack_event_id(i) for i in ids] == [(layer, step, a) for step in range(3) for layer in range(4)
                                                 for a in range(3)]
    assert unpack_event_id(pack_event_id(65535, 10**9, 255)) == (65535, 10**9, 255)
    with pytest.raises(ValueError):
        pack_event_id(1 << 16, 0)
    with pytest.raises(ValueError):
        pack_event_id(0, 0, 256)


def test_notify_metadata_round_trips_and_garbage_is_corrupt_metadata():
    from xccl_net.dispatch_core import decode_meta, encode_meta

    meta = BlockMeta(event_id=pack_event_id(2, 9), sender=3, offset=4096, count=2,
                     expert_ids=np.array([1, 5], dtype=np.int32), incarnation=1_790_000_000_000_000_000)
    got = decode_meta(encode_meta(meta))
    assert (got.event_id, got.sender, got.offset, got.count, got.incarnation) == (meta.event_id, 3, 4096, 2,
                                                                                   meta.incarnation)
    assert got.expert_ids.tolist() == [1, 5] and got.expert_ids.dtype == np.int32
    buf = encode_meta(meta)
    for bad in (b"", b"\x01\x00\x00\x00", buf[:-3], buf + b"x", b"XB2" + buf[3:], buf[:-4]):
        with pytest.raises(CorruptMetadata):
            decode_meta(bad)
    refusal = BlockMeta(event_id=7, sender=1, offset=0, count=0, error="KeyError: é" * 1000)
    got = decode_meta(encode_meta(refusal))
    assert got.error and refusal.error.startswith(got.error) and got.expert_ids.size == 0
    bad_text = encode_meta(BlockMeta(event_id=7, sender=1, offset=0, count=0, error="ab"))[:-2] + b"\xff\xfe"
    with pytest.raises(CorruptMetadata, match="UTF-8"):
        decode_meta(bad_text)
    wrong_dtype = BlockMeta(event_id=1, sender=0, offset=0, count=1, expert_ids=np.array([1], dtype=np.int64))
    from services.common.wire import FieldError

    with pytest.raises(FieldError):
        encode_meta(wrong_dtype)  # the sender is stopped before anything goes on the wire
