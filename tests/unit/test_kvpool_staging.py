"""The prefill's KV staging area: allocation, acknowledged release, lazy lease reclaim."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from services.kvpool.staging import StagingArea, StagingTooSmall


def test_alloc_first_fit_and_release_makes_room_again() -> None:
    area = StagingArea(10, lease_s=5)
    a = area.alloc("r1", 4, now=0)
    b = area.alloc("r2", 4, now=0)
    assert (a.first_block, b.first_block) == (0, 4) and a.stage_id != b.stage_id
    assert area.alloc("r3", 3, now=1) is None and area.stats.full == 1   # 2 left, leases live
    assert area.release(a.stage_id, "r1")
    c = area.alloc("r3", 3, now=1)
    assert c is not None and c.first_block == 0 and area.used_blocks == 7


def test_release_is_idempotent_and_checks_the_owner() -> None:
    area = StagingArea(4, lease_s=5)
    a = area.alloc("r1", 2, now=0)
    assert not area.release(a.stage_id, "someone-else")     # a peer's wrong claim frees nothing
    assert area.release(a.stage_id, "r1")
    assert not area.release(a.stage_id, "r1")                # duplicate ack
    b = area.alloc("r1", 2, now=0)                           # same request replayed: a new id
    assert b.stage_id != a.stage_id
    assert not area.release(a.stage_id, "r1") and len(area) == 1   # the old ack does not free the new stage
    assert area.stats.stale_releases == 3


def test_expired_stages_are_reclaimed_only_when_the_room_is_needed() -> None:
    area = StagingArea(4, lease_s=5)
    a = area.alloc("r1", 2, now=0)
    area.alloc("r2", 2, now=3)
    small = area.alloc("small", 1, now=100)                  # room is needed: the oldest expired goes
    assert small is not None and small.first_block == 0
    assert a.stage_id not in {s.stage_id for s in area._stages.values()}
    assert area.stats.reclaimed == 1
    # Not expired: never reclaimed, the allocation waits instead.
    area2 = StagingArea(2, lease_s=5)
    area2.alloc("r1", 2, now=0)
    assert area2.alloc("r2", 1, now=4.9) is None and area2.stats.reclaimed == 0


def test_a_sequence_larger_than_the_area_is_a_configuration_error() -> None:
    with pytest.raises(StagingTooSmall):
        StagingArea(4, lease_s=1).alloc("r", 5, now=0)
    with pytest.raises(StagingTooSmall):
        StagingArea(4, lease_s=1).alloc("r", 0, now=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6), st.integers(0, 3)), max_size=60))
def test_stages_never_overlap_and_stay_inside(ops) -> None:
    area = StagingArea(16, lease_s=3)
    now = 0.0
    live = []
    for is_alloc, n, dt in ops:
        now += dt
        if is_alloc or not live:
            st_ = area.alloc(f"r{len(live)}", n, now)
            if st_ is not None:
                live.append(st_)
        else:
            s = live.pop(n % len(live))
            area.release(s.stage_id, s.owner)
        held = sorted(area._stages.values(), key=lambda s: s.first_block)
        for x, y in zip(held, held[1:]):
            assert x.first_block + x.nblocks <= y.first_block
        assert all(0 <= s.first_block and s.first_block + s.nblocks <= 16 for s in held)
        assert area.used_blocks <= 16
