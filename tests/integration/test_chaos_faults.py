"""The chaos tool's process faults on a real process that plays a pod service (its command line
says ``--name NAME`` as ``services.run`` does): each proves itself from /proc, and refuses a PID
that is not the service it was told."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.chaos import faults as F

pytestmark = pytest.mark.integration


@pytest.fixture
def service():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--name", "expert-7"])
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


async def test_hang_then_continue_then_kill(service) -> None:
    proof = await F.stop("expert-7", service.pid)
    assert "state T" in proof and F.proc_state(service.pid) == "T"
    assert "running again" in await F.cont("expert-7", service.pid)
    assert F.proc_state(service.pid) in ("S", "R")
    with pytest.raises(F.FaultNotInjected, match="did not stay stopped"):
        await F.cont("expert-7", service.pid)       # not stopped: a hang that did not hold is caught
    assert "gone from /proc" in await F.kill("expert-7", service.pid)
    assert service.wait(timeout=10) == -9


async def test_graceful_stop_waits_for_the_exit(service) -> None:
    assert "exited" in await F.terminate("expert-7", service.pid)
    assert service.wait(timeout=10) == -15


async def test_a_pid_of_another_service_or_none_is_refused(service) -> None:
    with pytest.raises(F.FaultNotInjected, match="is not that service"):
        await F.kill("expert-1", service.pid)
    assert service.poll() is None                   # untouched
    service.kill()
    service.wait(timeout=10)
    with pytest.raises(F.FaultNotInjected, match="does not exist"):
        await F.stop("expert-7", service.pid)
