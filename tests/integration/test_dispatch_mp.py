"""Dispatch/combine across processes: the N expert ranks live in a child process (shm
endpoints), the M attention ranks in the test; results are bitwise the direct computation,
and a killed expert process turns into a typed error within the timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.integration.test_dispatch import (
    ATTN,
    EXP,
    EXPERT_FN,
    LAYOUT,
    M,
    PLACEMENT,
    assert_bitwise,
    gates,
    shm_entries,
)
from xccl_net.dispatch import A2EDispatcher
from xccl_net.dispatch_core import pack_event_id, reference_moe
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.errors import PeerUnreachable, XcclTimeout

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 20.0


def _cfg(name: str, namespace: str, npu: int, run_dir: str, window: str, size: int) -> EndpointConfig:
    return EndpointConfig(name=name, namespace=namespace, kind="shm", npu=npu, ring_slots=4, slot_bytes=4096,
                          windows={window: size})


async def _expert_main(namespace: str, run_dir: str) -> None:
    """Child: every expert rank serves events until SIGTERM (the handler only sets an event)."""
    from xccl_net.dispatch import E2AHandler

    eps = [await open_endpoint(_cfg(name, namespace, M + r, run_dir, "a2e", LAYOUT.a2e_window_bytes))
           for r, name in enumerate(EXP)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with asyncio.TaskGroup() as tg:
            async def serve(r: int) -> None:
                h = E2AHandler(eps[r], rank=r, source_peers=ATTN, placement=PLACEMENT, layout=LAYOUT)
                while True:
                    try:
                        await h.serve_event(EXPERT_FN, timeout_s=3600.0)
                    except XcclTimeout:
                        continue

            tasks = [tg.create_task(serve(r)) for r in range(len(EXP))]
            sys.stdout.write("READY\n")
            sys.stdout.flush()
            await stop.wait()
            for t in tasks:
                t.cancel()
    finally:
        for ep in eps:
            await ep.close()


def child_main() -> None:
    import uvloop

    uvloop.run(_expert_main(sys.argv[1], sys.argv[2]))


@pytest.fixture
def expert_process(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(namespace: str) -> subprocess.Popen:
        code = "from tests.integration.test_dispatch_mp import child_main; child_main()"
        p = subprocess.Popen([sys.executable, "-c", code, namespace, str(tmp_path)], stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if p.stdout:
            p.stdout.close()


async def _ready(p: subprocess.Popen) -> None:
    line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), READY_TIMEOUT_S)
    assert line.strip() == "READY", f"expert process said {line!r} (exit {p.poll()})"


async def test_expert_ranks_in_another_process(expert_process, tmp_path):
    namespace = f"m{uuid.uuid4().hex[:10]}"
    eps = []
    try:
        eps = [await open_endpoint(_cfg(name, namespace, s, str(tmp_path), "e2a", LAYOUT.e2a_window_bytes))
               for s, name in enumerate(ATTN)]
        child = expert_process(namespace)
        await _ready(child)
        ds = [A2EDispatcher(eps[s], source=s, expert_peers=EXP, placement=PLACEMENT, layout=LAYOUT)
              for s in range(M)]
        for step in range(4):
            xs, ids, ws = gates(100 + step)
            outs = await asyncio.gather(*(d.run_layer(pack_event_id(0, step), xs[s], ids[s], ws[s], timeout_s=10.0)
                                          for s, d in enumerate(ds)))
            assert_bitwise(outs, reference_moe(xs, ids, ws, EXPERT_FN))
        # kill -9 of the whole expert side: the next layer fails, typed and bounded.
        child.kill()
        child.wait(5)
        xs, ids, ws = gates(200)
        t0 = time.monotonic()
        with pytest.raises((PeerUnreachable, XcclTimeout)):
            await ds[0].run_layer(pack_event_id(0, 9), xs[0], ids[0], ws[0], timeout_s=1.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        for ep in eps:
            await ep.close()
    # The killed child could not unlink its segments; what remains must be only its own, and
    # we remove them by name so no test leaves /dev/shm entries behind.
    for name in shm_entries(namespace):
        os.unlink(os.path.join("/dev/shm", name))
