"""Waiting on conditions without sleeping: test doubles call ``CHANGED.notify()`` whenever
something a test may wait on changed (a push arrived, a message was handled); tests await
``CHANGED.until(cond, timeout_s)``, which re-checks the condition on every notification and
fails with TimeoutError at the deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changed:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self, *_: object) -> None:
        self._event.set()

    async def until(self, cond: Callable[[], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while True:
                self._event.clear()   # clear before checking: a notify after the check is kept
                if cond():
                    return
                await self._event.wait()
