"""Where process faults land: the pod's local processes (``xds up``) or its containers (Compose).

The runner picks ONE back-end per experiment (``PodHandle.process_faults()``) and calls the
same four verbs whatever the pod is; each verb returns the evidence lines for the report and
raises ``FaultNotInjected`` when the fault cannot be proven to have taken effect:

- ``kill(name)``    a crash: SIGKILL of the service's (container's main) process;
- ``hang(name)``    frozen until ``resume(name)`` (SIGSTOP/SIGCONT; ``docker pause/unpause``);
- ``stop(name, restart)`` a graceful stop; ``restart`` also proves the service came back;
- ``cleanup()``     whatever is still frozen is resumed (an experiment never leaves the pod broken).

``straggler_address(name)`` is where the service's admin RPC is reached from here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from services.chaos import faults as F


class ProcessFaults(Protocol):
    kind: str        # "process" or "container": what the evidence talks about

    async def kill(self, name: str) -> list[str]: ...

    async def hang(self, name: str) -> str: ...

    async def resume(self, name: str) -> str: ...

    async def stop(self, name: str, restart: bool) -> list[str]: ...

    async def cleanup(self) -> None: ...


class LocalProcesses:
    """Signals to the pod's processes, proven through /proc (``faults``)."""
    kind = "process"

    def __init__(self, pid: Callable[[str], int], restart_within_s: float, poll_s: float = 0.05) -> None:
        self.pid = pid                      # the service's current PID (its ready file)
        self.restart_within_s = restart_within_s
        self.poll_s = poll_s
        self._stopped: dict[str, int] = {}  # hung services not yet continued

    async def kill(self, name: str) -> list[str]:
        return [await F.kill(name, self.pid(name))]

    async def hang(self, name: str) -> str:
        pid = self.pid(name)
        evidence = await F.stop(name, pid)
        self._stopped[name] = pid
        return evidence

    async def resume(self, name: str) -> str:
        return await F.cont(name, self._stopped.pop(name))

    async def stop(self, name: str, restart: bool) -> list[str]:
        pid = self.pid(name)
        out = [await F.terminate(name, pid)]
        if restart:
            out.append(await self._restarted(name, pid))
        return out

    async def _restarted(self, name: str, old_pid: int) -> str:
        deadline = time.monotonic() + self.restart_within_s
        while time.monotonic() < deadline:
            try:
                pid = self.pid(name)
            except F.FaultNotInjected:
                pid = old_pid
            if pid != old_pid and not F.gone(pid):
                return f"restarted by the supervisor as pid {pid} (ready file)"
            await asyncio.sleep(self.poll_s)
        raise F.FaultNotInjected(f"{name}: not restarted (no new ready PID) after the graceful stop")

    async def cleanup(self) -> None:
        for name, pid in list(self._stopped.items()):
            try:
                await F.cont(name, pid)
            except (F.FaultNotInjected, ProcessLookupError):
                pass   # already running or gone; the supervisor handles a gone one
        self._stopped.clear()
