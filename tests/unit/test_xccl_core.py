"""Pure p2p core: framing, chunking and the receiver's checks, without any transport."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xccl_net.errors import ChunkOrderError, CorruptMetadata, EventIdMismatch
from xccl_net.p2p_core import (
    FLAG_RESET, KIND_DATA, ChunkHeader, Delivered, Discarded, Reassembler, Violation, as_byte_views,
    frame_prefix, gather_into, n_chunks_for, split_message,
)

CB = 16


def chunks(event: int, data: bytes, flags: int = 0) -> list[tuple[ChunkHeader, memoryview]]:
    n = n_chunks_for(len(data), CB)
    return [(ChunkHeader(event, k, n, len(data), KIND_DATA, flags if k == 0 else 0),
             memoryview(data)[k * CB:(k + 1) * CB]) for k in range(n)]


def feed(r: Reassembler, items) -> list:
    out = []
    for h, p in items:
        out.extend(r.on_chunk(h, p))
    return out


def encode(frames: list[bytes]) -> bytes:
    views = as_byte_views(frames)
    return frame_prefix(views) + b"".join(bytes(v) for v in views)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=70), max_size=6), st.integers(1, 5))
def test_any_frames_survive_chunking_and_reassembly(frames, event):
    msg = encode(frames)
    pieces = as_byte_views([frame_prefix(as_byte_views(frames)), *frames])
    rebuilt = bytearray(len(msg))
    gather_into(memoryview(rebuilt), pieces, 0)
    assert bytes(rebuilt) == msg
    r = Reassembler(CB, 1 << 20)
    r.last_event = event - 1
    (eff,) = feed(r, chunks(event, msg))
    assert isinstance(eff, Delivered) and eff.event_id == event
    assert [bytes(f) for f in split_message(eff.data)] == frames


def test_duplicates_are_discarded_by_event_id():
    r = Reassembler(CB, 1 << 20)
    data = bytes(range(40))
    effs = feed(r, chunks(1, data) + chunks(1, data) + chunks(2, b"x"))
    assert [type(e) for e in effs] == [Delivered, Discarded, Discarded, Discarded, Delivered]


def test_duplicate_chunk_inside_a_message_is_discarded():
    r = Reassembler(CB, 1 << 20)
    c = chunks(1, bytes(40))
    effs = feed(r, [c[0], c[0], c[1], c[2]])
    assert [type(e) for e in effs] == [Discarded, Delivered]


def test_reordered_chunks_raise_chunk_order_and_pair_recovers():
    r = Reassembler(CB, 1 << 20)
    c = chunks(1, bytes(40))
    effs = feed(r, [c[0], c[2]])
    assert len(effs) == 1 and isinstance(effs[0], Violation) and isinstance(effs[0].error, ChunkOrderError)
    assert feed(r, [c[1]]) == [Discarded(1, 1)]  # the rest of the broken message is ignored
    (ok,) = feed(r, chunks(2, b"next"))
    assert isinstance(ok, Delivered) and ok.data == b"next"


def test_first_chunk_missing_is_chunk_order_error():
    r = Reassembler(CB, 1 << 20)
    (v,) = feed(r, chunks(1, bytes(40))[1:2])
    assert isinstance(v.error, ChunkOrderError)


def test_event_gap_is_mismatch_unless_reset():
    r = Reassembler(CB, 1 << 20)
    (v,) = feed(r, chunks(3, b"a"))
    assert isinstance(v, Violation) and isinstance(v.error, EventIdMismatch)
    assert r.last_event == 0  # a mismatch does not consume the expected id
    (d,) = feed(r, chunks(1, b"a"))
    assert isinstance(d, Delivered)
    (d,) = feed(r, chunks(7, b"b", flags=FLAG_RESET))
    assert isinstance(d, Delivered) and r.last_event == 7


def test_reset_drops_a_half_written_message_silently():
    r = Reassembler(CB, 1 << 20)
    c = chunks(1, bytes(40))
    effs = feed(r, [c[0]] + chunks(2, b"after-timeout", flags=FLAG_RESET))
    assert [type(e) for e in effs] == [Delivered] and effs[0].event_id == 2


@pytest.mark.parametrize("header,nbytes", [
    (ChunkHeader(1, 0, 1, 10, 9, 0), 10),           # unknown kind
    (ChunkHeader(1, 0, 2, 10, KIND_DATA, 0), 10),   # wrong chunk count
    (ChunkHeader(1, 3, 1, 10, KIND_DATA, 0), 10),   # chunk id beyond count
    (ChunkHeader(1, 0, 1, 10, KIND_DATA, 0), 9),    # payload size disagrees
    (ChunkHeader(1, 0, 1, 1 << 40, KIND_DATA, 0), 16),  # bigger than allowed
    (ChunkHeader(0, 0, 1, 1, KIND_DATA, 0), 1),     # event ids start at 1
])
def test_impossible_headers_are_corrupt_metadata(header, nbytes):
    r = Reassembler(CB, 1 << 20)
    (v,) = r.on_chunk(header, memoryview(bytes(nbytes)))
    assert isinstance(v, Violation) and isinstance(v.error, CorruptMetadata)
    (ok,) = feed(r, chunks(1, b"fine"))
    assert isinstance(ok, Delivered)


@pytest.mark.parametrize("raw", [b"", b"\x01\x00\x00\x00", encode([b"abc"])[:-1], encode([b"abc"]) + b"!",
                                 b"\xff\xff\xff\xff" + bytes(8)])
def test_corrupt_frame_tables_are_rejected(raw):
    with pytest.raises(CorruptMetadata):
        split_message(raw)
