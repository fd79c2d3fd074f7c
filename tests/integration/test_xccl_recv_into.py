"""recv_into across real processes (shm): 16 MiB straight into the caller's buffer, and a peer
stopped (SIGSTOP) or killed (SIGKILL) in the middle of a message gathered into a posted buffer.

The child is tests/integration/xccl_child.py (echoes every message). To catch it mid-message the
test keeps its own event loop from running, so nothing drains the ring the child writes into
our segment, until the child has filled that ring and waits for space inside a 16 MiB message.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.faults import proc_state
from tests.integration.test_xccl_processes import _open_parent, children, namespace  # noqa: F401  (fixtures)
from xccl_net.errors import PeerUnreachable, XcclTimeout
from xccl_net.layout import P_TAIL, P_TAKEN

pytestmark = pytest.mark.integration
MIB = 1 << 20


def _unread_slots(ep, peer: str) -> int:
    """Slots ``peer`` wrote into its ring in ``ep``'s segment that ``ep`` has not consumed yet
    (read from ep's own segment: the peer entry's tail, and ep's reader head)."""
    idx = ep._links[peer].local_idx
    st = ep._inbound.get(idx)
    return ep._seg.words[ep._geo.entry_word(idx, P_TAIL)] - (st.head if st is not None else 0)


def _hold_loop_until_ring_full(ep, peer: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _unread_slots(ep, peer) < ep.cfg.ring_slots:
        assert time.monotonic() < deadline, "the child never filled the ring"
        os.sched_yield()


async def test_16_mib_and_small_messages_land_byte_exact_in_the_posted_buffer(namespace, children):
    parent = await _open_parent("shm", namespace)
    try:
        child = children("shm", namespace, "child")
        await child.ready()
        buf = np.zeros(16 * MIB + 4096, dtype=np.uint8)
        buf[:] = 1  # pre-touched, reused for every message
        big = np.random.default_rng(7).integers(0, 256, 16 * MIB, dtype=np.uint8)
        for frames in ([big], [b"ping"], [b"a", b"", big[:100_003].tobytes(), b"z"]):
            posted = parent.post_recv("child", buf)  # posted before the child can answer
            await parent.send("child", frames, timeout_s=10)
            src, got, nbytes = await posted.wait(timeout_s=10)
            assert src == "child" and [bytes(f) for f in got] == [bytes(memoryview(f)) for f in frames]
            assert all(np.shares_memory(np.frombuffer(f, dtype=np.uint8), buf) for f in got if f.nbytes)
        assert parent.stats["recvs_into_direct"] == 3 and parent.stats["recvs_into_copied"] == 0
    finally:
        await parent.close()


async def test_stopped_peer_mid_message_times_out_and_the_buffer_is_never_written_again(namespace, children):
    parent = await _open_parent("shm", namespace)
    try:
        child = children("shm", namespace, "child")
        await child.ready()
        big = np.random.default_rng(8).integers(0, 256, 16 * MIB, dtype=np.uint8)
        buf = np.zeros(16 * MIB + 4096, dtype=np.uint8)
        posted = parent.post_recv("child", buf)
        await parent.send("child", [big], timeout_s=10)  # the echo starts coming back now
        _hold_loop_until_ring_full(parent, "child")
        os.kill(child.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while proc_state(child.proc.pid) != "T":  # the stop proves itself before anything relies on it
            assert time.monotonic() < deadline
            os.sched_yield()
        with pytest.raises(XcclTimeout):
            await posted.wait(timeout_s=0.3)  # drains the full ring into buf, then times out
        assert posted.state == "released" and parent.stats["recvs_into_direct"] == 0
        buf[:] = 0xEE  # the caller owns it again
        os.kill(child.proc.pid, signal.SIGCONT)
        src, frames = await parent.recv("child", timeout_s=10)  # the rest went to a fresh buffer
        assert [bytes(f) for f in frames] == [big.tobytes()]  # nothing lost, including the part in buf
        assert not np.any(buf != 0xEE)  # and nothing written into buf after the timeout
    finally:
        await parent.close()


async def test_peer_killed_mid_message_fails_the_posted_receive_typed_and_fast(namespace, children):
    parent = await _open_parent("shm", namespace)
    try:
        child = children("shm", namespace, "child")
        await child.ready()
        big = np.random.default_rng(9).integers(0, 256, 16 * MIB, dtype=np.uint8)
        buf = np.zeros(16 * MIB + 4096, dtype=np.uint8)
        posted = parent.post_recv("child", buf)
        await parent.send("child", [big], timeout_s=10)
        _hold_loop_until_ring_full(parent, "child")
        pid = child.proc.pid
        child.kill9()
        assert not os.path.exists(f"/proc/{pid}")  # gone (reaped), before anything relies on it
        t0 = time.monotonic()
        with pytest.raises(PeerUnreachable, match="died in the middle of a message"):
            await posted.wait(timeout_s=10)
        assert time.monotonic() - t0 < 2.0
        assert posted.state == "failed"
        with pytest.raises(XcclTimeout):  # nothing half-delivered afterwards
            await parent.recv("child", timeout_s=0.2)
    finally:
        await parent.close()


async def test_16_mib_written_by_the_peer_process_straight_into_a_window_buffer(namespace, children):
    from xccl_net.endpoint import EndpointConfig, open_endpoint

    cfg = EndpointConfig(name="parent", namespace=namespace, kind="shm", npu=0, ring_slots=8, slot_bytes=64 * 1024,
                         windows={"rx": 16 * MIB + 4096}, poll_s=0.02)
    parent = await open_endpoint(cfg)
    try:
        child = children("shm", namespace, "child")
        await child.ready()
        win = parent.window("rx")
        big = np.random.default_rng(10).integers(0, 256, 16 * MIB, dtype=np.uint8)
        for frames in ([big], [b"a", big[:300_001].tobytes(), b"", b"z"]):
            posted = parent.post_recv("child", win)
            await parent.send("child", frames, timeout_s=10)
            src, got, _ = await posted.wait(timeout_s=10)
            assert [bytes(f) for f in got] == [bytes(memoryview(f)) for f in frames]
            assert all(np.shares_memory(np.frombuffer(f, dtype=np.uint8), win) for f in got if f.nbytes)
        assert parent.stats["recvs_into_sender_wrote"] == 2
    finally:
        await parent.close()


def _hold_loop_until_taken(ep, posted, timeout_s: float = 10.0) -> None:
    """Keep ep's loop from running until the peer claimed ``posted``'s window buffer (it then
    writes the message into it; its ring record waits for our loop)."""
    word = ep._geo.entry_word(ep._links[posted.peer].local_idx, P_TAKEN)
    deadline = time.monotonic() + timeout_s
    while ep._seg.words[word] != posted.direct_seq:
        assert time.monotonic() < deadline, "the child never claimed the offered buffer"
        os.sched_yield()


async def test_offers_withdrawn_while_the_peer_process_writes_lose_and_duplicate_nothing(namespace, children):
    """Withdraw window offers while the child's echo has claimed them (cancel, or a wait whose
    timeout has passed) or may be claiming them: every echo arrives exactly once, in order,
    byte-exact; a claimed buffer is never handed back while the child may write into it."""
    from xccl_net.endpoint import EndpointConfig, open_endpoint

    cfg = EndpointConfig(name="parent", namespace=namespace, kind="shm", npu=0, ring_slots=8, slot_bytes=64 * 1024,
                         windows={"rx": 1 * MIB}, poll_s=0.02)
    parent = await open_endpoint(cfg)
    try:
        child = children("shm", namespace, "child")
        await child.ready()
        win = parent.window("rx")
        for i in range(45):
            msg = i.to_bytes(4, "little") * 50_000  # 200 KB: the child writes it directly when offered
            posted = parent.post_recv("child", win)
            await parent.send("child", [msg], timeout_s=10)
            mode = i % 3
            if mode == 0:  # claimed, then cancelled: the message goes to the inbox as a copy
                _hold_loop_until_taken(parent, posted)
                posted.cancel()
                got = (await parent.recv("child", timeout_s=10))[1]
            elif mode == 1:  # claimed, and the timeout has passed: wait for the writer anyway
                _hold_loop_until_taken(parent, posted)
                got = (await posted.wait(timeout_s=1e-6)).frames
                assert posted.state == "done"
            else:  # cancelled at once: races with the claim
                posted.cancel()
                got = (await parent.recv("child", timeout_s=10))[1]
            assert [bytes(f) for f in got] == [msg], f"message {i}"
        with pytest.raises(XcclTimeout):  # and nothing extra
            await parent.recv("child", timeout_s=0.2)
        assert parent.stats["recvs_into_sender_wrote"] >= 15 and not parent._draining
    finally:
        await parent.close()


async def test_a_message_half_received_into_a_fresh_buffer_moves_into_a_late_post(namespace, children):
    parent = await _open_parent("shm", namespace)
    try:
        child = children("shm", namespace, "child")
        await child.ready()
        big = np.random.default_rng(11).integers(0, 256, 16 * MIB, dtype=np.uint8)
        await parent.send("child", [big], timeout_s=10)  # nothing posted: the echo starts fresh
        _hold_loop_until_ring_full(parent, "child")
        parent._pump()  # consume what the ring holds now: a partial message in a fresh buffer
        assert parent.stats["recvs_into_direct"] == 0 and not parent._inbox
        buf = np.zeros(16 * MIB + 4096, dtype=np.uint8)
        src, got, _ = await parent.recv_into("child", buf, timeout_s=10)  # adopts it: copied once
        assert [bytes(f) for f in got] == [big.tobytes()]
        assert np.shares_memory(np.frombuffer(got[0], dtype=np.uint8), buf)
        assert parent.stats["recvs_into_direct"] == 1 and parent.stats["recvs_into_copied"] == 0
    finally:
        await parent.close()
