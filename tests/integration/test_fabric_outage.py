"""XCCL keeps moving data while the fabric simulator is dead (kill -9) or hung (SIGSTOP).

A real simulator process and two shm endpoints (each with its own fabric client) exchange
sends and puts continuously. The simulator is killed, then restarted on the same address;
then stopped, then continued. Every transfer succeeds byte-exact throughout; while the
simulator is gone the unmodelled counters grow; once it is back timing resumes (grants
again, the counters stop growing) and a link fault it injects fails transfers again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from fabric_sim.launch import SimProcess, start_sim, start_sim_from
from services.api.xds.v1 import fabric_pb2 as pb
from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc
from tests.faults import proc_state
from tests.waiting import Changed
from tests.xccl_fixtures import shm_entries
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.errors import LinkDown
from xccl_net.fabric_client import FabricClient

pytestmark = pytest.mark.integration

CONFIG = dict(servers=2, npus_per_server=4, time_scale=1000.0, admin_port=0)
PAYLOAD = 64 * 1024
WAIT_S = 20.0   # generous deadlines for a loaded 2-core host; conditions end the waits early


class Traffic:
    """a -> b sends and puts in a loop, each one checked byte for byte; notifies on progress."""

    def __init__(self, a, b, changed: Changed) -> None:
        self.a, self.b, self.changed = a, b, changed
        self.done = 0
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        while not self.stop.is_set():
            i = self.done
            payload = np.full(PAYLOAD, i % 251, dtype=np.uint8)
            payload[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
            await self.a.send("b", [payload], timeout_s=5)
            src, frames = await self.b.recv("a", timeout_s=5)
            assert src == "a" and bytes(frames[0]) == payload.tobytes(), f"transfer {i} corrupted"
            await self.a.put("b", "win", 0, payload[:4096], notify=i.to_bytes(8, "little"), timeout_s=5)
            note = await self.b.recv_notify(timeout_s=5)
            assert note.src == "a" and bytes(note.notify) == i.to_bytes(8, "little")
            assert bytes(self.b.window("win")[:4096]) == payload[:4096].tobytes(), f"put {i} corrupted"
            self.done += 1
            self.changed.notify()

    async def halt(self) -> None:
        """Stop after the current round; a failure of any transfer is raised here."""
        self.stop.set()
        await asyncio.wait_for(self.task, WAIT_S)

    async def advance(self, n: int) -> None:
        target = self.done + n
        await self.changed.until(lambda: self.done >= target, WAIT_S)


@pytest.fixture
async def rig(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("fo")
    sims: list[SimProcess] = []
    namespace = f"fo{uuid.uuid4().hex[:8]}"
    first = start_sim(d, {**CONFIG, "data_address": f"ipc://{d}/f.sock"})
    sims.append(first)
    changed = Changed()
    clients, eps = [], []
    task = None
    try:
        for name, npu in (("a", 0), ("b", 1)):
            fab = await FabricClient.connect(first.data_address, name=name, npu=npu, deadline_s=0.25,
                                             probe_interval_s=0.1)
            fab.watchers.append(changed.notify)
            clients.append(fab)
            eps.append(await open_endpoint(EndpointConfig(
                name=name, namespace=namespace, npu=npu, ring_slots=8, slot_bytes=256 * 1024,
                windows={"win": 4096}), fabric=fab))
        traffic = Traffic(*eps, changed)
        task = traffic.task = asyncio.create_task(traffic.run())

        def restart() -> SimProcess:
            p = start_sim_from(first.config_path, first.ready_file, first.stderr_path)
            sims.append(p)
            return p

        yield traffic, clients, sims, restart
        await traffic.halt()   # re-raises any transfer failure
    finally:
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for ep in eps:
            await ep.close()
        for c in clients:
            await c.close()
        for p in sims:
            if p.proc.poll() is None:
                os.kill(p.pid, signal.SIGCONT)   # a stopped process cannot handle SIGTERM
            assert p.stop() in (0, -signal.SIGKILL)
        assert shm_entries(namespace) == []


def unmodelled(clients) -> int:
    return sum(c.stats["unmodelled_transfers"] for c in clients)


async def assert_timing_resumed(traffic: Traffic, clients) -> None:
    await traffic.changed.until(lambda: all(c.modelled for c in clients), WAIT_S)
    before_u, before_g = unmodelled(clients), clients[0].stats["grants"]
    await traffic.advance(10)
    assert unmodelled(clients) == before_u, "transfers still unmodelled after the simulator came back"
    assert clients[0].stats["grants"] >= before_g + 10


async def test_transfers_survive_kill9_and_timing_resumes_after_restart(rig):
    traffic, clients, sims, restart = rig
    a = clients[0]
    await traffic.advance(5)
    assert a.modelled and a.stats["grants"] >= 5 and unmodelled(clients) == 0

    sims[0].kill()
    assert proc_state(sims[0].pid) == "", "the simulator must be gone"
    await traffic.advance(20)                      # data keeps moving with no simulator at all
    assert not a.modelled and a.stats["outages"] == 1
    grown = unmodelled(clients)
    assert grown >= 20
    await traffic.advance(5)
    assert unmodelled(clients) > grown             # and each of those transfers is counted

    second = restart()
    assert second.data_address == sims[0].data_address and second.pid != sims[0].pid
    await assert_timing_resumed(traffic, clients)
    assert a.epoch == second.info["epoch"]

    # Alive again, a link fault it injects fails transfers as it always did.
    async with grpc.aio.insecure_channel(second.admin_address) as ch:
        stub = pb_grpc.FabricStub(ch)
        await traffic.halt()
        await stub.SetLinkState(pb.SetLinkStateRequest(link="npu1.rx", up=False), timeout=5)
        with pytest.raises(LinkDown) as info:
            await traffic.a.send("b", [b"x"], timeout_s=5)
        assert info.value.link == "npu1.rx" and a.modelled
        await stub.ClearFaults(pb.ClearFaultsRequest(), timeout=5)
        await traffic.a.send("b", [b"y"], timeout_s=5)
        assert bytes((await traffic.b.recv("a", timeout_s=5))[1][0]) == b"y"


async def test_transfers_survive_sigstop_and_late_replies_are_discarded(rig):
    traffic, clients, sims, _ = rig
    a = clients[0]
    sim = sims[0]
    await traffic.advance(5)
    epoch = a.epoch

    os.kill(sim.pid, signal.SIGSTOP)
    # Signal delivery is asynchronous: re-check on every transfer (they keep coming).
    await traffic.changed.until(lambda: proc_state(sim.pid) == "T", WAIT_S)
    await traffic.advance(20)                      # a hung simulator does not hold transfers
    assert not a.modelled and unmodelled(clients) >= 20
    stray = a.stats["stray_replies"]

    os.kill(sim.pid, signal.SIGCONT)
    await assert_timing_resumed(traffic, clients)
    assert a.epoch == epoch                        # the same process, continued
    # What it read while stopped was answered late and discarded, never taken for a new answer.
    assert a.stats["stray_replies"] > stray
    assert a.stats["outages"] == 1
