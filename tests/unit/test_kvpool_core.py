from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from services.kvpool.core import HashRing, KVPoolCore, UnknownBlock, block_hashes


def test_hash_chain_keys_prefixes_not_blocks() -> None:
    a = block_hashes(list(range(40)), 8)
    assert len(a) == 5                                          # 40 tokens, 5 full blocks
    assert block_hashes(list(range(47)), 8) == a                # partial block has no key
    b = block_hashes([99] + list(range(1, 40)), 8)              # first token differs...
    assert all(x != y for x, y in zip(a, b))                    # ...so every later key differs
    assert block_hashes(list(range(16)), 8) == a[:2]


def test_reserve_commit_match_acquire_release() -> None:
    pool = KVPoolCore(4)
    hs = block_hashes(list(range(24)), 8)
    got = pool.reserve(hs, "w1", now=0)
    assert [h for h, _ in got] == hs and len({s for _, s in got}) == 3
    assert pool.match(hs) == 0                                  # writing blocks are invisible
    assert pool.reserve(hs, "w2", now=0) == []                  # someone is already writing them
    pool.commit(hs[:2], "w1")
    assert pool.match(hs) == 2
    slots = pool.acquire(hs, "r1", now=1)
    assert slots == [s for _, s in got[:2]] and pool.stats().pinned == 2
    assert pool.release(hs, "r1") == 2 and pool.release(hs, "r1") == 0
    with pytest.raises(UnknownBlock):
        pool.commit(hs[2:], "someone-else")


def test_lru_eviction_spares_pinned_and_writing_blocks() -> None:
    pool = KVPoolCore(3)
    a, b, c, d = (block_hashes([i] * 8, 8)[0] for i in range(4))
    for h in (a, b, c):
        pool.reserve([h], "w", 0)
        pool.commit([h], "w")
    pool.acquire([a], "reader", 1)                              # a pinned (and most recent)
    b_slot = pool._blocks[b].slot
    assert pool.reserve([d], "w", 2) == [(d, b_slot)]            # b was least recently used
    assert pool.match([b]) == 0 and pool.match([a]) == 1 and pool.stats().evictions == 1
    pool.reserve([block_hashes([7] * 8, 8)[0]], "w", 3)         # evicts c (a pinned, d writing)
    assert pool.match([c]) == 0 and pool.match([a]) == 1
    assert pool.reserve([block_hashes([8] * 8, 8)[0]], "w", 4) == []   # nothing evictable: no slot


def test_leases_expire_so_dead_clients_do_not_leak() -> None:
    pool = KVPoolCore(2, lease_s=5)
    hs = block_hashes(list(range(16)), 8)
    pool.reserve(hs, "dead-writer", now=0)
    assert pool.stats().free == 0
    assert pool.expire(now=5.0) == 2 and pool.stats().free == 2
    pool.reserve(hs, "w", now=6)
    pool.commit(hs, "w")
    pool.acquire(hs, "dead-reader", now=6)
    assert pool.stats().pinned == 2
    pool.expire(now=11.0)
    assert pool.stats().pinned == 0 and pool.match(hs) == 2


def test_release_owner_frees_everything_it_held() -> None:
    pool = KVPoolCore(4)
    hs = block_hashes(list(range(32)), 8)
    pool.reserve(hs[:2], "req", 0)
    pool.commit(hs[:2], "req")
    pool.reserve(hs[2:], "req", 0)
    pool.acquire(hs, "req", 0)
    assert pool.release_owner("req") == 4                      # 2 pins + 2 reservations
    assert pool.stats() == pool.stats().__class__(4, 2, 0, 0, 2, 2, 2, 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "commit", "acquire", "release", "expire"]),
                          st.integers(0, 5), st.integers(0, 3)), max_size=60))
def test_slots_are_never_shared_or_lost(ops) -> None:
    pool = KVPoolCore(5, lease_s=3)
    chains = [block_hashes([i] * 24, 8) for i in range(6)]
    now = 0.0
    for op, c, who in ops:
        now += 0.5
        hs, name = chains[c], f"c{who}"
        if op == "reserve":
            pool.reserve(hs, name, now)
        elif op == "commit":
            mine = [h for h in hs if h in pool._blocks and pool._blocks[h].state == "writing"
                    and pool._blocks[h].owner == name]
            pool.commit(mine, name)
        elif op == "acquire":
            pool.acquire(hs, name, now)
        elif op == "release":
            pool.release(hs, name)
        else:
            pool.expire(now)
        used = [b.slot for b in pool._blocks.values()]
        assert len(set(used)) == len(used)
        assert sorted(used + pool._free) == list(range(5))


def test_consistent_hashing_spreads_and_moves_little() -> None:
    keys = [h for i in range(300) for h in block_hashes([i] * 8, 8)]
    ring3 = HashRing(["kv-0", "kv-1", "kv-2"])
    spread = Counter(ring3.node_for(k) for k in keys)
    assert set(spread) == {"kv-0", "kv-1", "kv-2"} and min(spread.values()) > 50
    ring4 = HashRing(["kv-0", "kv-1", "kv-2", "kv-3"])
    moved = [k for k in keys if ring3.node_for(k) != ring4.node_for(k)]
    assert all(ring4.node_for(k) == "kv-3" for k in moved)      # only the new node takes keys
    assert len(moved) < len(keys) * 0.45
    with pytest.raises(ValueError):
        HashRing([])
