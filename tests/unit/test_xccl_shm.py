"""shm transport specifics: a peer writing garbage into the shared metadata, name ownership."""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import tempfile

import pytest

from tests.xccl_fixtures import XNet, shm_entries
from xccl_net.doorbell import Doorbell, NameInUse, Ringer, bell_address
from xccl_net.errors import CorruptMetadata, EventIdMismatch, PeerUnreachable, XcclError
from xccl_net.layout import (
    H_BELL_PENDING, P_TAIL, S_CHECK, SLOT_HEADER_BYTES, find_entry, read_header, slot_check,
)
from xccl_net.p2p_core import KIND_DATA


@pytest.fixture
async def shm(tmp_path):
    net = XNet("shm", tmp_path)
    yield net
    await net.close()
    assert shm_entries(net.namespace) == []


class Rogue:
    """Maps the receiver's segment as a buggy peer would, and rings its doorbell."""

    def __init__(self, path: str, namespace: str, receiver: str, writer: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        self.buf = memoryview(self.mm)
        self.w = self.buf.cast("Q")
        self.hdr = read_header(self.buf, self.w)
        self.geo = self.hdr.geometry
        idx = find_entry(self.buf, self.w, self.geo, writer)
        assert idx is not None
        self.idx = idx
        self.bell = bell_address(namespace, receiver)

    def ring(self) -> None:
        self.w[H_BELL_PENDING] = 1
        r = Ringer()
        r.ring(self.bell)
        r.close()

    def close(self) -> None:
        self.w.release()
        self.buf.release()
        self.mm.close()
        os.close(self.fd)


async def test_garbage_tail_pointer_is_corrupt_metadata_and_pair_recovers(shm: XNet):
    a, b = await shm.open("a"), await shm.open("b")
    await a.send("b", [b"one"])
    await b.recv("a")
    rogue = Rogue(b.segment_path, shm.namespace, "b", "a")
    try:
        tail_word = rogue.geo.entry_word(rogue.idx, P_TAIL)
        good = rogue.w[tail_word]
        rogue.w[tail_word] = 0xDEAD_BEEF_DEAD_BEEF
        rogue.ring()
        with pytest.raises(CorruptMetadata) as info:
            await b.recv(timeout_s=2)
        assert info.value.peer == "a"
        rogue.w[tail_word] = good
    finally:
        rogue.close()
    await a.send("b", [b"two"])  # the endpoint stayed up and the pair still works
    assert bytes((await b.recv("a", timeout_s=2))[1][0]) == b"two"


async def test_wrong_event_id_in_slot_is_event_id_mismatch(shm: XNet):
    a, b, c = await shm.open("a"), await shm.open("b"), await shm.open("c")
    await a.send("b", [b"one"])
    await b.recv("a")
    rogue = Rogue(b.segment_path, shm.namespace, "b", "a")
    try:
        tail_word = rogue.geo.entry_word(rogue.idx, P_TAIL)
        tail = rogue.w[tail_word]
        off = rogue.geo.slot_off(rogue.idx, tail)
        msg = b"\x00\x00\x00\x00"  # empty frame table
        rogue.buf[off + SLOT_HEADER_BYTES:off + SLOT_HEADER_BYTES + len(msg)] = msg
        hw = (999, 0, 1, len(msg), len(msg), KIND_DATA, 0)  # well-formed, but event 999 != 2
        base = off // 8
        for i, v in enumerate(hw):
            rogue.w[base + i] = v
        rogue.w[base + S_CHECK] = slot_check(hw)
        rogue.w[tail_word] = tail + 1
        rogue.ring()
        with pytest.raises(EventIdMismatch):
            await b.recv(timeout_s=2)
    finally:
        rogue.close()
    await c.send("b", [b"from-c"])  # other peers are unaffected
    assert bytes((await b.recv("c", timeout_s=2))[1][0]) == b"from-c"


async def test_garbage_slot_header_is_corrupt_metadata(shm: XNet):
    a, b = await shm.open("a"), await shm.open("b")
    await a.send("b", [b"one"])
    await b.recv("a")
    rogue = Rogue(b.segment_path, shm.namespace, "b", "a")
    try:
        tail_word = rogue.geo.entry_word(rogue.idx, P_TAIL)
        tail = rogue.w[tail_word]
        base = rogue.geo.slot_off(rogue.idx, tail) // 8
        for i in range(8):
            rogue.w[base + i] = 0x0123_4567_89AB_CDEF * (i + 1) & 0xFFFF_FFFF_FFFF_FFFF
        rogue.w[tail_word] = tail + 1
        rogue.ring()
        with pytest.raises(CorruptMetadata):
            await b.recv(timeout_s=2)
    finally:
        rogue.close()


async def test_second_open_of_a_live_name_is_refused(shm: XNet):
    await shm.open("a")
    with pytest.raises(NameInUse):
        await shm.open("a")
    assert isinstance(NameInUse("x"), XcclError)
    assert len(shm_entries(shm.namespace)) == 1


async def test_segment_geometry_and_windows_are_published(shm: XNet):
    a = await shm.open("a", windows={"kv": 10_000, "a2e": 5000}, npu=7)
    fd = os.open(a.segment_path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
            buf = memoryview(mm)
            w = buf.cast("Q")
            hdr = read_header(buf, w)
            assert (hdr.npu, hdr.pid, hdr.geometry.ring_slots, hdr.geometry.slot_bytes) == (7, os.getpid(), 4, 4096)
            assert {k: v[1] for k, v in hdr.windows.items()} == {"kv": 10_000, "a2e": 5000}
            w.release()
            buf.release()
    finally:
        os.close(fd)
    assert a.window("kv").nbytes == 10_000


@pytest.fixture
def bell_dir():
    d = tempfile.mkdtemp(prefix="xb", dir="/tmp")   # short: socket paths are limited to 107 bytes
    yield d
    shutil.rmtree(d)


def test_file_doorbells_ring_refuse_a_second_live_owner_and_replace_a_dead_ones_file(bell_dir):
    # What kill -9 of an owner leaves behind: a bound socket file nobody reads.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(bell_address("ns", "a", bell_dir))
    dead.close()
    ringer = Ringer()
    with pytest.raises(PeerUnreachable):
        ringer.ring(bell_address("ns", "a", bell_dir))
    owner = Doorbell("ns", "a", bell_dir)      # replaces the stale file
    with pytest.raises(NameInUse):
        Doorbell("ns", "a", bell_dir)          # a live owner's file is never taken
    ringer.ring(owner.address)
    assert owner.drain() == 1
    owner.close()
    assert os.listdir(bell_dir) == []          # close removes the file
    with pytest.raises(PeerUnreachable):
        ringer.ring(owner.address)
    ringer.close()


def test_a_doorbell_path_too_long_for_a_unix_socket_is_a_clear_error():
    with pytest.raises(XcclError, match="107"):
        bell_address("ns", "a", "/tmp/" + "d" * 120)


def test_closing_a_file_doorbell_never_removes_a_successors_file(bell_dir):
    first = Doorbell("ns", "a", bell_dir)
    os.unlink(first.address)                 # its file replaced behind its back ...
    second = Doorbell("ns", "a", bell_dir)   # ... by a successor's
    first.close()
    ringer = Ringer()
    ringer.ring(second.address)              # the successor is still reachable
    assert second.drain() == 1
    ringer.close()
    second.close()
    assert os.listdir(bell_dir) == []


async def test_idle_safety_poll_backs_off_and_a_doorbell_restores_it(shm: XNet, monkeypatch):
    """An endpoint that hears no doorbell stretches its safety-net poll (an idle pod must not wake
    every poll_s); the first doorbell brings it back, and nothing is missed meanwhile."""
    import xccl_net.shm_endpoint as se
    from xccl_net.errors import XcclTimeout
    monkeypatch.setattr(se, "IDLE_POLL_MAX_S", 0.08)
    a, b = await shm.open("a"), await shm.open("b")
    with pytest.raises(XcclTimeout):
        await a.recv(timeout_s=0.4)                  # idle: ticks at 0.02, 0.04, 0.08, 0.08 ...
    assert a._idle_poll_s == 0.08
    await b.send("a", [b"wake"])                     # acked only once a heard the doorbell
    src, frames = await a.recv(timeout_s=1.0)
    assert (src, bytes(frames[0])) == ("b", b"wake")
    assert a._idle_poll_s == a.cfg.poll_s
