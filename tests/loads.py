"""The pod's counters as its services publish them: the latest heartbeat load of every
service (what the routers see), for tests that wait on them (never sleep)."""

from __future__ import annotations

import asyncio

from services.common.heartbeat import HeartbeatSubscriber
from services.common.liveness import DetectorConfig, FailureDetector
from services.pod.spec import address, services


class Loads:
    def __init__(self, pod) -> None:
        addrs = [address(pod.spec, s.name, "heartbeat") for s in services(pod.spec) if s.role != "fabric"]
        self.sub = HeartbeatSubscriber(addrs, detector=FailureDetector(DetectorConfig(1.0, 3.0)))
        self._beats: asyncio.Queue = asyncio.Queue()
        self.changed = asyncio.Event()
        self.sub._on_beat = self._on_beat

    def _on_beat(self, beat) -> None:
        self._beats.put_nowait(beat)
        self.changed.set()

    async def __aenter__(self) -> Loads:
        self.task = asyncio.create_task(self.sub.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def load(self, name: str) -> dict[str, float]:
        """The latest load of ``name`` ({} before its first beat)."""
        b = self.sub.latest.get(name)
        return dict(b.load) if b else {}

    async def fresh(self, name: str, timeout_s: float = 10.0) -> dict[str, float]:
        """The load in a beat of ``name`` published after this call."""
        seq = self.sub.latest[name].seq if name in self.sub.latest else -1

        async def wait():
            while True:
                b = await self._beats.get()
                if b.service == name and b.seq > seq + 1:
                    return dict(b.load)
        return await asyncio.wait_for(wait(), timeout_s)

    async def until(self, cond, timeout_s: float) -> None:
        """Until ``cond()`` holds, re-checked on every beat."""
        async with asyncio.timeout(timeout_s):
            while True:
                self.changed.clear()
                if cond():
                    return
                await self.changed.wait()
