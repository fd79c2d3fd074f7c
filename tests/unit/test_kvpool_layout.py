"""KV pool block layout (pack/unpack, bitwise), KVRef construction, and the pool's message handling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.common.wire import WireError, decode, encode
from services.kvpool.core import KVPoolCore, block_hashes
from services.kvpool.handler import MAX_KEYS, Pin, PoolHandler, Refused
from services.kvpool.layout import BlockLayout, KVLayoutError, kv_ref, ref_keys, runs, tail_key
from services.model.config import ModelConfig
from services.protocol.inference import KVRef
from services.protocol.kvpool import Acquire, Commit, Release, Reserve, Slots, Stats, StatsQuery

CFG = ModelConfig()


def random_kv(layout: BlockLayout, capacity: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (layout.num_kv_heads, capacity, layout.head_dim)
    # Random bit patterns (NaNs, infs, -0.0 included): the round trip must be a pure byte copy.
    return [tuple(rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.float32) for _ in "kv")
            for _ in range(layout.num_layers)]


def test_block_geometry_follows_the_model() -> None:
    lay = BlockLayout.of(CFG, 16)
    assert lay.block_shape == (4, 2, 2, 16, 16)
    assert lay.block_bytes == 4 * 2 * 2 * 16 * 16 * 4
    assert [lay.num_blocks(n) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


@settings(max_examples=40, deadline=None)
@given(block_size=st.integers(1, 9), num_tokens=st.integers(1, 40), extra=st.integers(0, 5), seed=st.integers(0, 99))
def test_pack_unpack_round_trip_is_bitwise(block_size: int, num_tokens: int, extra: int, seed: int) -> None:
    lay = BlockLayout.of(CFG, block_size)
    kv = random_kv(lay, num_tokens + extra, seed)
    blocks = lay.pack(kv, num_tokens)
    assert blocks.shape == (lay.num_blocks(num_tokens), *lay.block_shape) and blocks.flags.c_contiguous
    # Through raw bytes, as over XCCL.
    back = lay.unpack(lay.view_blocks(blocks.tobytes(), blocks.shape[0]), num_tokens)
    for (k, v), (k2, v2) in zip(kv, back):
        assert k2.shape == (lay.num_kv_heads, num_tokens, lay.head_dim)
        assert k2.flags.c_contiguous and k2.flags.writeable and v2.flags.c_contiguous and v2.flags.writeable
        assert k2.view(np.uint32).tobytes() == np.ascontiguousarray(k[:, :num_tokens]).view(np.uint32).tobytes()
        assert v2.view(np.uint32).tobytes() == np.ascontiguousarray(v[:, :num_tokens]).view(np.uint32).tobytes()
    # Padding of a partial tail is zeros, never bytes of positions beyond num_tokens.
    pad = blocks[-1][:, :, :, num_tokens - (blocks.shape[0] - 1) * block_size:]
    assert not pad.view(np.uint32).any()


def test_block_bytes_put_position_p_of_layer_l_where_the_layout_says() -> None:
    lay = BlockLayout.of(CFG, 4)
    kv = random_kv(lay, 10, 3)
    blocks = lay.pack(kv, 10)
    l, h, p, d = 2, 1, 9, 5
    raw = blocks.tobytes()
    off = (((((p // 4) * lay.num_layers + l) * 2 + 1) * lay.num_kv_heads + h) * 4 + p % 4) * lay.head_dim + d
    assert np.frombuffer(raw, np.float32)[off].tobytes() == kv[l][1][h, p, d].tobytes()


def test_pack_refuses_kv_that_does_not_fit() -> None:
    lay = BlockLayout.of(CFG, 4)
    kv = random_kv(lay, 8, 0)
    with pytest.raises(KVLayoutError, match="layers"):
        lay.pack(kv[:-1], 8)
    with pytest.raises(KVLayoutError, match="cannot hold 9"):
        lay.pack(kv, 9)
    bad = list(kv)
    bad[1] = (np.zeros(kv[1][0].shape, np.float64), kv[1][1])
    with pytest.raises(KVLayoutError, match="float32"):
        lay.pack(bad, 8)
    with pytest.raises(KVLayoutError):
        lay.unpack(np.zeros((1, *lay.block_shape), np.float32), 5)
    with pytest.raises(KVLayoutError):
        lay.view_blocks(b"\0" * (lay.block_bytes - 4), 1)


def test_kv_ref_full_blocks_and_private_tail() -> None:
    toks = list(range(37))
    ref = kv_ref(toks, "req-1", 16)
    assert ref == KVRef(37, 16, tuple(block_hashes(toks, 16)), tail_key("req-1", toks))
    assert len(ref.block_hashes) == 2 and len(ref.tail_key) == 16
    assert ref_keys(ref) == [*ref.block_hashes, ref.tail_key]
    # The tail key is private: another owner or other tokens give another key, and it is no chain key.
    assert tail_key("req-2", toks) != ref.tail_key
    assert tail_key("req-1", toks[:-1] + [0]) != ref.tail_key
    assert ref.tail_key not in block_hashes(toks + [0] * 11, 16)
    # A multiple of the block size has no tail; the ref survives the wire unchanged.
    exact = kv_ref(list(range(32)), "req-1", 16)
    assert exact.tail_key == b"" and ref_keys(exact) == list(exact.block_hashes)
    assert decode(encode(ref)) == ref
    with pytest.raises(KVLayoutError):
        kv_ref([], "req-1", 16)


@pytest.mark.parametrize("ref", [
    KVRef(0, 16, (), b""),
    KVRef(20, 16, (), b"x" * 16),                      # missing a full-block hash
    KVRef(20, 16, (b"a" * 16,), b""),                  # missing the tail key
    KVRef(16, 16, (b"a" * 16,), b"t" * 16),            # tail key without a tail
    KVRef(16, 16, (b"short",), b""),                   # bad key length
])
def test_ref_keys_refuses_inconsistent_refs(ref: KVRef) -> None:
    with pytest.raises(KVLayoutError):
        ref_keys(ref)


def test_runs_merge_consecutive_blocks_in_consecutive_slots() -> None:
    assert runs([]) == []
    assert runs([(0, 5), (1, 6), (2, 7), (3, 2), (4, 3), (6, 4)]) == [(0, 5, 3), (3, 2, 2), (6, 4, 1)]
    assert runs([(2, 7), (0, 5), (1, 6)]) == [(0, 5, 3)]


# ---------------------------------------------------------------------- message handling

def hs(n: int, seed: int = 0) -> tuple[bytes, ...]:
    return tuple(block_hashes([seed] * (4 * n), 4))


def test_handler_maps_the_protocol_onto_the_core() -> None:
    h = PoolHandler(KVPoolCore(4), block_bytes=64)
    keys = hs(3)
    got = h.handle(Reserve("w", keys), now=0)
    assert isinstance(got, Slots) and got.hashes == keys and len(set(got.slots)) == 3 and got.block_bytes == 64
    assert h.handle(Commit("w", keys[:2]), now=0) is None
    pin = h.handle(Pin("dec", keys), now=0)
    assert pin.hashes == keys[:2] and pin.slots == got.slots[:2]
    st = h.handle(StatsQuery(), now=0)
    assert (st.hits, st.misses, st.pinned, st.writing) == (0, 0, 2, 1)      # a Pin is no lookup
    acq = h.handle(Acquire("r", keys), now=0)
    assert acq.hashes == keys[:2]
    assert h.handle(StatsQuery(), now=0) == Stats(4, 2, 1, 2, 1, 2, 1, 0)
    h.handle(Release("r", keys[:2]), now=0)
    h.handle(Release("dec", (), everything=True), now=0)
    h.handle(Release("w", (), everything=True), now=0)                         # drops w's reservation
    st = h.handle(StatsQuery(), now=0)
    assert (st.pinned, st.writing, st.free) == (0, 0, 2)
    assert h.load() == {"free_blocks": 2.0, "ready_blocks": 2.0, "pinned_blocks": 0.0, "writing_blocks": 0.0,
                        "hits": 2.0, "misses": 1.0, "evictions": 0.0}


@pytest.mark.parametrize("msg, code, words", [
    (Commit("w", hs(1, 9)), "NOT_FOUND", "not being written"),
    (Acquire("", hs(1)), "INVALID_ARGUMENT", "owner"),
    (Reserve("w" * 300, hs(1)), "INVALID_ARGUMENT", "owner"),
    (Acquire("r", (b"short",)), "INVALID_ARGUMENT", "block key 0 is 5 bytes"),
    (Reserve("w", (b"\0" * 16,) * (MAX_KEYS + 1)), "INVALID_ARGUMENT", "block keys in one request"),
    (Release("w", hs(1), everything=True), "INVALID_ARGUMENT", "not both"),
    (Slots((), (), 1), "INVALID_ARGUMENT", "does not handle Slots"),
])
def test_handler_refuses_bad_requests_and_keeps_state(msg: object, code: str, words: str) -> None:
    h = PoolHandler(KVPoolCore(4), block_bytes=64)
    keys = hs(2)
    h.handle(Reserve("w", keys), now=0)
    h.handle(Commit("w", keys[:1]), now=0)
    before = h.handle(StatsQuery(), now=0)
    with pytest.raises(Refused) as info:
        h.handle(msg, now=0)
    assert info.value.code == code and words in info.value.message
    assert h.handle(StatsQuery(), now=0) == before and h.refused == 1
    # A commit naming one unknown block commits none of the batch.
    if isinstance(msg, Commit):
        with pytest.raises(Refused):
            h.handle(Commit("w", (keys[1], *msg.hashes)), now=0)
        assert h.handle(StatsQuery(), now=0).writing == 1


def test_pin_message_round_trips_and_rejects_wrong_types() -> None:
    msg = Pin("req", hs(2))
    assert decode(encode(msg)) == msg
    frames = encode(Acquire("req", hs(1)))
    with pytest.raises(WireError):
        decode([bytes(frames[0]).replace(b"kv.Acquire", b"kv.Pinned!")])   # an unknown tag


def test_leases_of_dead_writers_and_readers_expire() -> None:
    core = KVPoolCore(1, lease_s=1.0)
    h = PoolHandler(core, block_bytes=64)
    key = hs(1)
    assert h.handle(Reserve("dead-writer", key), now=0).hashes == key
    assert h.handle(Reserve("w", key), now=0.5).hashes == ()            # still held
    assert h.handle(Reserve("w", key), now=1.5).hashes == key           # lease over: taken over
    h.handle(Commit("w", key), now=1.5)
    assert h.handle(Pin("dead-reader", key), now=2).slots == (0,)
    assert h.handle(Reserve("w2", hs(1, 7)), now=2.5).hashes == ()      # pinned: not evictable
    core.expire(3.5)                                                    # what the service's timer does
    assert h.handle(StatsQuery(), now=3.5).pinned == 0
    assert h.handle(Reserve("w2", hs(1, 7)), now=3.5).hashes == hs(1, 7)
    with pytest.raises(Refused, match="NOT_FOUND"):
        h.handle(Commit("dead-writer", key), now=3.5)
