"""Pure reassembly into a caller's buffer: claim, release mid-message, adopt mid-message, pack_into."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_xccl_core import CB, chunks, encode, feed
from xccl_net.errors import BufferTooSmall
from xccl_net.p2p_core import (
    FLAG_RESET, KIND_NOTIFY, ChunkHeader, Delivered, Reassembler, as_byte_views, pack_into, split_message,
)


class Posts:
    """The claim side of an endpoint: hands out one buffer, records what was asked."""

    def __init__(self, size: int | None) -> None:
        self.buf = None if size is None else np.full(size, 0xEE, dtype=np.uint8)
        self.asked: list[int] = []
        self.target = None

    def claim(self, total: int):
        self.asked.append(total)
        if self.buf is None or total > self.buf.nbytes:
            return None
        self.target = self.buf[:total]
        return self.target


@pytest.mark.parametrize("size", [5, 16, 17, 100])  # one chunk, exactly one, just over, many
def test_a_claimed_buffer_receives_the_message_and_delivery_points_into_it(size):
    posts = Posts(200)
    r = Reassembler(CB, 1 << 20, claim=posts.claim)
    data = bytes(range(size))
    (eff,) = feed(r, chunks(1, data))
    assert isinstance(eff, Delivered) and eff.into
    assert np.shares_memory(eff.data, posts.buf) and bytes(eff.data) == data
    assert bytes(posts.buf[size:]) == b"\xee" * (200 - size)  # nothing beyond the message


def test_no_claim_or_too_small_means_a_fresh_buffer_exactly_as_before():
    posts = Posts(10)
    r = Reassembler(CB, 1 << 20, claim=posts.claim)
    (eff,) = feed(r, chunks(1, bytes(40)))
    assert not eff.into and not np.shares_memory(np.asarray(memoryview(eff.data)), posts.buf)
    assert posts.asked == [40] and bytes(posts.buf) == b"\xee" * 10


def test_notifications_never_claim_the_caller_buffer():
    posts = Posts(100)
    r = Reassembler(CB, 1 << 20, claim=posts.claim)
    (eff,) = r.on_chunk(ChunkHeader(1, 0, 1, 8, KIND_NOTIFY, 0), memoryview(b"notify!!"))
    assert eff.data == b"notify!!" and not eff.into and posts.asked == []


def test_release_mid_message_moves_the_partial_and_never_writes_the_buffer_again():
    posts = Posts(100)
    r = Reassembler(CB, 1 << 20, claim=posts.claim)
    data = bytes(range(60))
    c = chunks(1, data)
    assert feed(r, c[:2]) == [] and r.holds(posts.target)
    assert r.release(posts.target) and not r.holds(posts.target)
    posts.buf[:] = 0x11  # the caller owns it again and reuses it
    (eff,) = feed(r, c[2:])
    assert not eff.into and bytes(eff.data) == data  # nothing lost
    assert bytes(posts.buf) == b"\x11" * 100  # and nothing written after the release
    assert not r.release(posts.target)  # idempotent


def test_adopt_moves_a_message_in_progress_into_a_late_buffer():
    posts = Posts(None)
    r = Reassembler(CB, 1 << 20, claim=posts.claim)
    data = bytes(range(70))
    c = chunks(1, data)
    feed(r, c[:3])
    assert not r.adopt()  # nothing posted yet
    posts.buf = np.zeros(80, dtype=np.uint8)
    assert r.adopt() and r.holds(posts.target)
    (eff,) = feed(r, c[3:])
    assert eff.into and bytes(eff.data) == data and np.shares_memory(eff.data, posts.buf)
    assert not r.adopt()  # nothing in progress


def test_a_sender_restarting_mid_message_reuses_the_claimed_buffer_for_the_new_message():
    posts = Posts(100)
    r = Reassembler(CB, 1 << 20, claim=posts.claim)
    feed(r, chunks(1, bytes(50))[:2])  # the sender gave up on event 1 after two chunks
    (eff,) = feed(r, chunks(2, b"new message!" * 3, flags=FLAG_RESET))
    assert eff.into and bytes(eff.data) == b"new message!" * 3 and eff.event_id == 2


def test_pack_into_lays_out_the_wire_format_or_writes_nothing():
    frames = [b"head", b"", bytes(range(30))]
    want = encode(frames)
    buf = np.full(len(want) + 5, 0xEE, dtype=np.uint8)
    views, used = pack_into(buf, as_byte_views(frames))
    assert used == len(want) and bytes(buf[:used]) == want
    assert [bytes(v) for v in views] == frames and [bytes(v) for v in split_message(buf[:used])] == frames
    small = np.full(len(want) - 1, 0xEE, dtype=np.uint8)
    with pytest.raises(BufferTooSmall) as err:
        pack_into(small, as_byte_views(frames))
    assert (err.value.needed, err.value.have) == (len(want), len(want) - 1)
    assert str(len(want)) in str(err.value) and bytes(small) == b"\xee" * small.nbytes


def test_a_direct_record_is_delivered_as_such_and_never_claims():
    from xccl_net.errors import CorruptMetadata
    from xccl_net.p2p_core import DIRECT_RECORD_BYTES, FLAG_DIRECT, KIND_DATA, Violation, direct_record, parse_direct

    posts = Posts(100)
    r = Reassembler(CB, 1 << 20, claim=posts.claim)
    rec = direct_record(7, 12345)
    (eff,) = r.on_chunk(ChunkHeader(1, 0, 1, DIRECT_RECORD_BYTES, KIND_DATA, FLAG_DIRECT), memoryview(rec))
    assert eff.direct and not eff.into and parse_direct(eff.data) == (7, 12345) and posts.asked == []
    assert r.last_event == 1
    (bad,) = r.on_chunk(ChunkHeader(2, 0, 1, 5, KIND_DATA, FLAG_DIRECT), memoryview(b"12345"))
    assert isinstance(bad, Violation) and isinstance(bad.error, CorruptMetadata)
