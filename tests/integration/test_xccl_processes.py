"""XCCL p2p across real processes: round trips, kill -9 of a peer, stale segments, fabric timing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.xccl_fixtures import shm_entries
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.errors import LinkDown, PeerUnreachable, XcclTimeout

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


class Child:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.xccl_child", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.address = ""

    async def ready(self, timeout_s: float = 10.0) -> None:
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout_s)
        assert line.startswith("READY"), f"child did not start: {line!r}"
        self.address = line.split()[1] if len(line.split()) > 1 else ""

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def namespace():
    ns = f"p{uuid.uuid4().hex[:10]}"
    yield ns
    for f in shm_entries(ns):  # a SIGKILLed child leaves its segment: clean up, then check ours
        if not f.endswith(".child"):
            raise AssertionError(f"leftover {f}")
        os.unlink(f"/dev/shm/{f}")


@pytest.fixture
def children():
    started: list[Child] = []

    def start(*args: str) -> Child:
        c = Child(*args)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


async def _open_parent(kind: str, namespace: str, **kw):
    cfg = EndpointConfig(name="parent", namespace=namespace, kind=kind, npu=0, ring_slots=8,
                         slot_bytes=64 * 1024, windows={"kv": 1 << 20}, poll_s=0.02, **kw)
    return await open_endpoint(cfg)


@pytest.mark.parametrize("kind", ["shm", "tcp"])
async def test_round_trips_across_processes_are_byte_exact(kind, namespace, children):
    parent = await _open_parent(kind, namespace)
    try:
        child = children(kind, namespace, "child", *([f"parent={parent.address}"] if kind == "tcp" else []))
        await child.ready()
        if kind == "tcp":
            parent.set_peer_address("child", child.address)
        big = os.urandom(3 * 8 * 64 * 1024 + 17)  # three times the ring
        for frames in ([b"ping"], [b"a", b"", big]):
            await parent.send("child", frames, timeout_s=5)
            src, back = await parent.recv("child", timeout_s=5)
            assert src == "child" and [bytes(f) for f in back] == frames
        await parent.put("child", "kv", 100, b"remote-bytes")
        assert bytes(await parent.get("child", "kv", 100, 12)) == b"remote-bytes"
        assert child.stop() == 0
    finally:
        await parent.close()
    assert shm_entries(namespace) == []  # the child unlinked its segment on SIGTERM


@pytest.mark.parametrize("kind", ["shm", "tcp"])
async def test_send_to_a_killed_peer_fails_typed_within_timeout(kind, namespace, children):
    parent = await _open_parent(kind, namespace)
    try:
        child = children(kind, namespace, "child", *([f"parent={parent.address}"] if kind == "tcp" else []))
        await child.ready()
        if kind == "tcp":
            parent.set_peer_address("child", child.address)
        await parent.send("child", [b"hello"], timeout_s=5)
        await parent.recv("child", timeout_s=5)
        child.kill9()
        t0 = time.monotonic()
        with pytest.raises((PeerUnreachable, XcclTimeout)):
            await parent.send("child", [b"x" * 200_000], timeout_s=2)
        assert time.monotonic() - t0 < 3
        with pytest.raises((PeerUnreachable, XcclTimeout)):
            await parent.get("child", "kv", 0, 10, timeout_s=2)
    finally:
        await parent.close()


async def test_after_a_peer_is_killed_and_restarted_puts_and_sends_reach_the_new_process(namespace, children):
    """kill -9 leaves the dead peer's segment marked open; the restart maps a new file under the
    same name. The survivor's cached mapping must not swallow writes meant for the new process."""
    parent = await _open_parent("shm", namespace)
    try:
        child = children("shm", namespace, "child")
        await child.ready()
        await parent.put("child", "kv", 100, b"to-the-first")
        await parent.send("child", [b"WINDOW", b"100", b"12"], timeout_s=5)
        assert [bytes(f) for f in (await parent.recv("child", timeout_s=5))[1]] == [b"to-the-first"]
        child.kill9()
        child2 = children("shm", namespace, "child")
        await child2.ready()
        await parent.put("child", "kv", 100, b"to-the-second")
        await parent.send("child", [b"WINDOW", b"100", b"13"], timeout_s=5)
        assert [bytes(f) for f in (await parent.recv("child", timeout_s=5))[1]] == [b"to-the-second"]
        assert child2.stop() == 0
    finally:
        await parent.close()


async def test_stale_segment_of_a_killed_owner_is_replaced_at_next_open(namespace, children):
    child = children("shm", namespace, "child")
    await child.ready()
    path = f"/dev/shm/xds.{namespace}.child"
    old_inode = os.stat(path).st_ino
    child.kill9()
    assert os.path.exists(path)  # SIGKILL: nobody unlinked it
    ep = await open_endpoint(EndpointConfig(name="child", namespace=namespace, ring_slots=4, slot_bytes=4096))
    try:
        assert os.stat(path).st_ino != old_inode
    finally:
        await ep.close()
    assert not os.path.exists(path)


async def test_fabric_delay_holds_completion_and_link_down_propagates(namespace, tmp_path):
    fabric_sim = pytest.importorskip("fabric_sim.launch")
    grpc = pytest.importorskip("grpc")
    from fabric_sim.config import FabricConfig
    from fabric_sim.model import FabricModel, Grant, TransferRequest
    from services.api.xds.v1 import fabric_pb2 as pb
    from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc
    from services.common.config import from_mapping
    from xccl_net.fabric_client import FabricClient

    config = dict(servers=2, npus_per_server=4, time_scale=1000.0, data_address="tcp://127.0.0.1:0", admin_port=0)
    sim = fabric_sim.start_sim(tmp_path / "fab", config)
    clients, eps = [], []
    try:
        for name, npu in (("a", 0), ("b", 1)):
            fab = await FabricClient.connect(sim.data_address, name=name, npu=npu, deadline_s=5.0)
            clients.append(fab)
            eps.append(await open_endpoint(EndpointConfig(name=name, namespace=namespace, npu=npu,
                                                          ring_slots=8, slot_bytes=256 * 1024), fabric=fab))
        a, b = eps
        nbytes = 1_000_000
        grant = FabricModel(from_mapping(FabricConfig, config), now=0.0).reserve(
            TransferRequest(0, 1, nbytes + 12), 0.0)
        assert isinstance(grant, Grant) and grant.delay_s > 0.001
        t0 = time.monotonic()
        await a.send("b", [b"x" * nbytes], timeout_s=5)
        assert time.monotonic() - t0 >= grant.delay_s
        await b.recv("a")
        async with grpc.aio.insecure_channel(sim.admin_address) as ch:
            stub = pb_grpc.FabricStub(ch)
            await stub.SetLinkState(pb.SetLinkStateRequest(link="npu1.rx", up=False), timeout=5)
            with pytest.raises(LinkDown) as info:
                await a.send("b", [b"y"], timeout_s=2)
            assert info.value.link == "npu1.rx"
            await stub.ClearFaults(pb.ClearFaultsRequest(), timeout=5)
        await a.send("b", [b"z"], timeout_s=5)
        assert bytes((await b.recv("a"))[1][0]) == b"z"
    finally:
        for ep in eps:
            await ep.close()
        for c in clients:
            await c.close()
        assert sim.stop() == 0
