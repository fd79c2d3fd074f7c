"""Heartbeats between real processes: kill, hang (SIGSTOP), wake (SIGCONT) and restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from services.common.heartbeat import HeartbeatSubscriber
from services.common.liveness import DetectorConfig, FailureDetector, Liveness
from tests.faults import hang, resume

PUBLISHER = """
import asyncio, sys
from services.common.heartbeat import HeartbeatPublisher
async def main():
    pub = HeartbeatPublisher(sys.argv[1], service="decode-0", role="decode", group=0,
                             interval_s=0.05, load=lambda: {"running": 2, "free_kv_blocks": 7})
    print("ready", flush=True)
    await pub.run()
asyncio.run(main())
"""


def start_publisher(address: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", PUBLISHER, address], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


async def wait_state(sub: HeartbeatSubscriber, changes: asyncio.Queue, want: Liveness, timeout: float = 5.0):
    async def until():
        while True:
            c = await changes.get()
            if c.new is want:
                return c
    return await asyncio.wait_for(until(), timeout)


@pytest.fixture
def address(tmp_path) -> str:
    return f"ipc://{tmp_path}/hb.sock"


async def test_detects_hang_ignores_wakeup_and_sees_restart(address) -> None:
    procs: list[subprocess.Popen] = []
    changes: asyncio.Queue = asyncio.Queue()
    beats: asyncio.Queue = asyncio.Queue()
    sub = HeartbeatSubscriber([address], detector=FailureDetector(DetectorConfig(0.2, 0.5)),
                              on_change=changes.put_nowait, on_beat=beats.put_nowait)
    task = asyncio.create_task(sub.run())
    try:
        procs.append(start_publisher(address))
        first = await wait_state(sub, changes, Liveness.ALIVE)
        assert sub.detector.peers["decode-0"].info["free_kv_blocks"] == 7.0
        os.kill(procs[0].pid, signal.SIGSTOP)                     # hang: the socket stays open
        await wait_state(sub, changes, Liveness.SUSPECT)
        dead = await wait_state(sub, changes, Liveness.DEAD)
        assert dead.epoch == first.epoch
        os.kill(procs[0].pid, signal.SIGCONT)                     # wakes up: same epoch, stays dead
        while not beats.empty():
            beats.get_nowait()
        ignored_before = sub.detector.ignored_beats
        woke = await asyncio.wait_for(beats.get(), 5)             # a beat of the old epoch arrives...
        assert woke.epoch == first.epoch
        assert sub.detector.ignored_beats > ignored_before        # ...and is ignored
        assert sub.detector.state("decode-0") is Liveness.DEAD
        stop(procs[0])                                            # kill and restart: new epoch
        procs.append(start_publisher(address))
        back = await wait_state(sub, changes, Liveness.ALIVE)
        assert back.epoch != first.epoch
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for p in procs:
            stop(p)



STALE_PUBLISHER = """
import asyncio, sys
from services.common.heartbeat import HeartbeatPublisher, StaleIncarnation
async def main():
    pub = HeartbeatPublisher(sys.argv[1], service="expert-0", role="expert", interval_s=0.05, stale_after_s=0.4)
    print("ready", flush=True)
    try:
        await pub.run()
    except StaleIncarnation as exc:
        print(f"stale {exc.silent_s:.3f}", flush=True)
        sys.exit(75)
asyncio.run(main())
"""


async def test_a_publisher_silent_past_dead_after_ends_its_incarnation(address) -> None:
    """A hung process learns on waking that it was silent beyond the dead-after window: it sends
    no beat of the stale epoch and ends (its supervisor starts a new incarnation)."""
    changes: asyncio.Queue = asyncio.Queue()
    beats: asyncio.Queue = asyncio.Queue()
    sub = HeartbeatSubscriber([address], detector=FailureDetector(DetectorConfig(0.2, 0.5)),
                              on_change=changes.put_nowait, on_beat=beats.put_nowait)
    task = asyncio.create_task(sub.run())
    p = subprocess.Popen([sys.executable, "-c", STALE_PUBLISHER, address], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        await wait_state(sub, changes, Liveness.ALIVE)
        hang(p.pid)                                                  # verified: state T
        await wait_state(sub, changes, Liveness.DEAD)                # peers declared it dead
        while not beats.empty():
            beats.get_nowait()
        ignored = sub.detector.ignored_beats
        resume(p.pid)
        line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 5)
        assert line.startswith("stale ") and float(line.split()[1]) > 0.4
        assert await asyncio.to_thread(p.wait, 5) == 75
        assert beats.empty() and sub.detector.ignored_beats == ignored   # no beat of the stale epoch
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stop(p)


def test_stale_after_must_exceed_the_interval() -> None:
    from services.common.heartbeat import HeartbeatPublisher
    with pytest.raises(ValueError, match="stale_after_s"):
        HeartbeatPublisher("inproc://x", service="s", role="r", interval_s=0.5, stale_after_s=0.5)
