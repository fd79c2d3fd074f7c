"""recv_into / post_recv on every transport (shm, shm with file doorbells, tcp, mem), in one process.

shm gathers the ring chunks straight into the posted buffer; tcp and mem copy the received
message into it once. Multi-process cases (peer stopped or killed mid-message, 16 MiB) are in
tests/integration/test_xccl_recv_into.py.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from tests.xccl_fixtures import XNet, xnet  # noqa: F401  (fixture)
from xccl_net.errors import BufferTooSmall, EndpointClosed, WindowError, XcclTimeout
from xccl_net.p2p_core import split_message


def _b(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def _in(buf: np.ndarray, frames) -> bool:
    return all(np.shares_memory(np.frombuffer(f, dtype=np.uint8), buf) for f in frames if f.nbytes)


async def test_posted_receive_gets_a_multi_frame_message_byte_exact_in_the_buffer(xnet: XNet):
    a, b = await xnet.open("a"), await xnet.open("b")
    buf = np.full(128 * 1024, 0xEE, dtype=np.uint8)
    big = os.urandom(5 * 4 * 4096 + 7)  # several times the ring (4 slots of 4 KiB)
    frames = [b"head", np.arange(33, dtype=np.float32).tobytes(), b"", big]
    posted = b.post_recv("a", buf)
    await a.send("b", frames, timeout_s=5)
    src, got, nbytes = await posted.wait(timeout_s=5)
    assert src == "a" and _b(got) == frames and _in(buf, got)
    assert _b(split_message(buf[:nbytes])) == frames  # the buffer holds the wire layout
    assert bytes(buf[nbytes:nbytes + 16]) == b"\xee" * 16
    direct, copied = b.stats["recvs_into_direct"], b.stats["recvs_into_copied"]
    assert (direct, copied) == ((1, 0) if xnet.kind == "shm" else (0, 1))
    small = await asyncio.gather(b.recv_into("a", buf, timeout_s=5), a.send("b", [b"ping"], timeout_s=5))
    assert _b(small[0].frames) == [b"ping"]


async def test_a_message_waiting_before_the_post_is_copied_once_and_order_is_kept(xnet: XNet):
    a, b = await xnet.open("a"), await xnet.open("b")
    for i in range(3):
        await a.send("b", [bytes([i]) * 9000], timeout_s=5)  # acknowledged: all three wait in b's inbox
    buf = np.zeros(20000, dtype=np.uint8)
    got = [_b((await b.recv_into("a", buf, timeout_s=2)).frames) for _ in range(2)]
    assert got == [[bytes([0]) * 9000], [bytes([1]) * 9000]]
    assert _b((await b.recv("a", timeout_s=2))[1]) == [bytes([2]) * 9000]
    assert b.stats["recvs_into_copied"] == 2


@pytest.mark.parametrize("posted_first", [True, False])
async def test_too_small_buffer_is_a_typed_error_and_the_message_is_kept(xnet: XNet, posted_first):
    a, b = await xnet.open("a"), await xnet.open("b")
    payload = os.urandom(10_000)
    small = np.full(1000, 0xEE, dtype=np.uint8)
    if posted_first:
        posted = b.post_recv("a", small)
        await a.send("b", [payload], timeout_s=5)
    else:
        await a.send("b", [payload], timeout_s=5)
        posted = b.post_recv("a", small)
    with pytest.raises(BufferTooSmall) as err:
        await posted.wait(timeout_s=5)
    assert (err.value.needed, err.value.have, err.value.peer) == (10_000 + 12, 1000, "a")
    assert "10012" in str(err.value) and "1000" in str(err.value)
    assert bytes(small) == b"\xee" * 1000  # nothing written
    big = np.zeros(20_000, dtype=np.uint8)
    assert _b((await b.recv_into("a", big, timeout_s=2)).frames) == [payload]  # not lost


async def test_timeout_releases_the_buffer_and_a_later_message_goes_elsewhere(xnet: XNet):
    a, b = await xnet.open("a"), await xnet.open("b")
    buf = np.full(50_000, 0xEE, dtype=np.uint8)
    with pytest.raises(XcclTimeout):
        await b.recv_into("a", buf, timeout_s=0.1)
    await a.send("b", [b"late" * 5000], timeout_s=5)
    assert _b((await b.recv("a", timeout_s=2))[1]) == [b"late" * 5000]
    assert bytes(buf) == b"\xee" * buf.nbytes


async def test_concurrent_receives_into_buffers_of_two_peers(xnet: XNet):
    r = await xnet.open("r")
    a, b, c = await xnet.open("a"), await xnet.open("b"), await xnet.open("c")
    bufs = {"a": np.zeros(40_000, dtype=np.uint8), "b": np.zeros(40_000, dtype=np.uint8)}
    msgs = {p: [os.urandom(3000 + 5000 * k) for k in range(4)] for p in "abc"}

    async def take(p: str) -> list[bytes]:
        out = []
        for _ in range(4):
            got = await r.recv_into(p, bufs[p], timeout_s=5)
            assert got.src == p and _in(bufs[p], got.frames)
            out.append(bytes(got.frames[0]))
        return out

    async def send(ep) -> None:
        for m in msgs[ep.name]:
            await ep.send("r", [m], timeout_s=5)

    res = await asyncio.gather(take("a"), take("b"), send(a), send(b), send(c))
    assert res[0] == msgs["a"] and res[1] == msgs["b"]
    assert [bytes((await r.recv("c", timeout_s=2))[1][0]) for _ in range(4)] == msgs["c"]  # c unaffected


async def test_a_delivered_but_uncollected_message_is_requeued_on_cancel(xnet: XNet):
    a, b = await xnet.open("a"), await xnet.open("b")
    buf = np.zeros(10_000, dtype=np.uint8)
    posted = b.post_recv("a", buf)
    await a.send("b", [b"kept" * 1000], timeout_s=5)  # acknowledged: it is in the buffer now
    assert posted.state == "done"
    posted.cancel()
    buf[:] = 0  # the caller reuses the buffer at once
    assert _b((await b.recv("a", timeout_s=2))[1]) == [b"kept" * 1000]


async def test_misuse_and_close_are_typed(xnet: XNet):
    b = (await xnet.open("a"), await xnet.open("b"))[1]
    buf = np.zeros(1000, dtype=np.uint8)
    with pytest.raises(WindowError):
        b.post_recv("a", bytes(100))  # read-only
    with pytest.raises(WindowError):
        b.post_recv("a", np.zeros((10, 10), dtype=np.uint8)[:, 0])  # not contiguous
    posted = b.post_recv("a", buf)
    with pytest.raises(WindowError):
        b.post_recv("a", np.zeros(10, dtype=np.uint8))  # one post per peer
    waiter = asyncio.create_task(posted.wait(timeout_s=10))
    await asyncio.sleep(0)  # let it park (ordering inside this process only)
    await b.close()
    with pytest.raises(EndpointClosed):
        await asyncio.wait_for(waiter, 2)


# ---------------------------------------------------------------- shm: buffers posted in a window


async def _window_pair(xnet: XNet):
    if xnet.kind != "shm":
        pytest.skip("direct writes into a posted window buffer are an shm feature")
    return await xnet.open("a"), await xnet.open("b", windows={"kv": 64 * 1024, "rx": 256 * 1024})


async def test_a_buffer_in_a_window_is_written_by_the_sender_directly(xnet: XNet):
    a, b = await _window_pair(xnet)
    win = b.window("rx")
    big = os.urandom(100_000)  # > one slot: worth a direct write
    for frames in ([b"x", big], [b"small"], [big, b"", big[:5000]]):
        posted = b.post_recv("a", win[1000:])  # any part of a window
        await a.send("b", frames, timeout_s=5)
        got = await posted.wait(timeout_s=5)
        assert _b(got.frames) == frames and _in(win, got.frames)
    assert b.stats["recvs_into_sender_wrote"] == 2 and b.stats["recvs_into_direct"] == 1  # small: ring
    posted = b.post_recv("a", win[:1000])  # too small for the sender: ring, then BufferTooSmall
    await a.send("b", [big], timeout_s=5)
    with pytest.raises(BufferTooSmall):
        await posted.wait(timeout_s=5)
    assert _b((await b.recv("a", timeout_s=2))[1]) == [big]


async def test_a_withdrawn_window_buffer_is_never_written(xnet: XNet):
    a, b = await _window_pair(xnet)
    win = b.window("rx")
    win[:] = 0xEE
    with pytest.raises(XcclTimeout):
        await b.recv_into("a", win, timeout_s=0.05)
    posted = b.post_recv("a", win)
    posted.cancel()
    big = os.urandom(100_000)
    await a.send("b", [big], timeout_s=5)
    assert _b((await b.recv("a", timeout_s=2))[1]) == [big]
    assert not np.any(win != 0xEE) and b.stats["recvs_into_sender_wrote"] == 0


async def test_a_timeout_waits_while_the_writer_claims_the_buffer(xnet: XNet):
    """The writer claimed the buffer (P_TAKEN, written here by hand as the writer would) just as
    the receive timed out: wait() must not hand the buffer back while the writer may be writing;
    once the writer takes its claim back (it saw the withdrawal), the timeout is raised."""
    from xccl_net.layout import P_TAKEN

    a, b = await _window_pair(xnet)
    await a.send("b", [b"hello"], timeout_s=5)  # a's entry in b's segment exists
    await b.recv("a", timeout_s=2)
    posted = b.post_recv("a", b.window("rx"))
    taken = b._geo.entry_word(b._links["a"].local_idx, P_TAKEN)
    b._seg.words[taken] = posted.direct_seq
    waiter = asyncio.create_task(posted.wait(timeout_s=0.1))
    deadline = asyncio.get_running_loop().time() + 5
    while posted.state != "incoming":  # no event to wait on: the post's own state is the signal
        assert asyncio.get_running_loop().time() < deadline and not waiter.done()
        await asyncio.sleep(0.01)
    b._seg.words[taken] = 0  # the writer's abort
    with pytest.raises(XcclTimeout):
        await asyncio.wait_for(waiter, 5)
    assert posted.state == "released"
