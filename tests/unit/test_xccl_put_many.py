"""``put_many``: puts that leave together (a dispatch's blocks), each with its own outcome.

Every transport (shm, tcp, mem): the blocks land and each peer is notified; a put that fails
costs only itself; a batch larger than the ring, or facing a receiver whose notification queue
is full, waits for room and loses nothing. On shm with a fabric (the shared link table, no
simulator process), the fast path keeps the fabric's timing: a notification is never seen
before the delay the fabric granted, and a refused link fails only the puts that cross it.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from fabric_sim.config import FabricConfig
from fabric_sim.model import FabricModel, TransferRequest
from fabric_sim.table import LinkTable
from fabric_sim.topology import Topology
from tests.xccl_fixtures import XNet, xnet  # noqa: F401  (fixture)
from xccl_net.endpoint import PutSpec
from xccl_net.errors import LinkDown, PeerUnreachable, WindowError, XcclTimeout
from xccl_net.fabric_client import FabricClient


async def test_every_block_lands_and_each_peer_is_notified(xnet: XNet):
    a = await xnet.open("a")
    peers = [await xnet.open(f"p{i}", windows={"kv": 4096}) for i in range(3)]
    puts = [PutSpec(f"p{i}", "kv", 64 * i, bytes([i + 1]) * 100, f"n{i}".encode()) for i in range(3)]
    assert await a.put_many(puts, timeout_s=2) == [None, None, None]
    for i, p in enumerate(peers):
        note = await p.recv_notify(timeout_s=2)
        assert tuple(note) == ("a", "kv", 64 * i, 100, f"n{i}".encode())
        assert bytes(p.window("kv")[64 * i:64 * i + 100]) == bytes([i + 1]) * 100
    assert a.stats["puts"] == 3 and a.stats["put_bytes"] == 300


async def test_a_failing_put_costs_only_itself(xnet: XNet):
    a = await xnet.open("a")
    b = await xnet.open("b", windows={"kv": 4096})
    gone = await xnet.open("gone", windows={"kv": 4096})
    await gone.close()
    out = await a.put_many([PutSpec("b", "kv", 4000, b"x" * 200, b"too-far"),
                            PutSpec("gone", "kv", 0, b"y", b"to-the-dead"),
                            PutSpec("b", "kv", 0, b"ok", b"fine"),
                            PutSpec("b", "nope", 0, b"z", b"no-window")], timeout_s=1.0)
    assert isinstance(out[0], WindowError) and isinstance(out[3], WindowError), out
    assert isinstance(out[1], (PeerUnreachable, XcclTimeout)), out
    assert out[2] is None
    note = await b.recv_notify(timeout_s=2)
    assert note.notify == b"fine" and bytes(b.window("kv")[0:2]) == b"ok"
    with pytest.raises(XcclTimeout):   # the failed puts notified nothing
        await b.recv_notify(timeout_s=0.05)


async def test_a_peer_that_reads_nothing_never_holds_up_the_others_in_the_batch(xnet: XNet):
    # "stuck" takes one notification into its queue and stops reading: on shm its ring (4 slots)
    # fills and the rest of its puts must wait (tcp and mem queue notifications without that
    # back-pressure). "fast", listed after them, is notified at once anyway.
    a = await xnet.open("a")
    stuck = await xnet.open("stuck", windows={"kv": 4096}, inbox_max=1)
    fast = await xnet.open("fast", windows={"kv": 4096})
    puts = [PutSpec("stuck", "kv", k, bytes([k]), f"s{k}".encode()) for k in range(8)]
    puts.append(PutSpec("fast", "kv", 0, b"go", b"fast"))
    batch = asyncio.create_task(a.put_many(puts, timeout_s=1.0))
    note = await fast.recv_notify(timeout_s=0.9)
    assert note.notify == b"fast" and not batch.done()   # delivered while the stuck puts still wait
    out = await asyncio.wait_for(batch, 5)
    assert out[-1] is None, out
    if xnet.kind == "shm":   # the ring really filled: the last stuck puts ran out of time
        assert any(isinstance(e, XcclTimeout) for e in out[:-1]), out
    got = [(await stuck.recv_notify(timeout_s=2)).notify for _ in range(sum(e is None for e in out[:-1]))]
    assert got == [f"s{k}".encode() for k, e in enumerate(out[:-1]) if e is None]


async def test_more_puts_to_one_peer_than_its_ring_holds_arrive_in_order(xnet: XNet):
    # SMALL_GEOMETRY: 4 ring slots; 10 notifications to one peer in one batch must wait for room.
    a = await xnet.open("a")
    b = await xnet.open("b", windows={"kv": 4096})
    puts = [PutSpec("b", "kv", 8 * k, k.to_bytes(8, "little"), f"k{k}".encode()) for k in range(10)]
    assert await a.put_many(puts, timeout_s=5) == [None] * 10
    got = [(await b.recv_notify(timeout_s=2)).notify for _ in range(10)]
    assert got == [f"k{k}".encode() for k in range(10)]
    assert [int.from_bytes(bytes(b.window("kv")[8 * k:8 * k + 8]), "little") for k in range(10)] == list(range(10))
    if xnet.kind == "shm":
        assert a.stats["ring_waits"] >= 1   # it really found the ring full, and was woken


async def test_a_receiver_that_does_not_read_back_pressures_the_batch_nothing_lost(xnet: XNet):
    a = await xnet.open("a")
    b = await xnet.open("b", windows={"kv": 4096}, inbox_max=2)
    batch = asyncio.create_task(a.put_many(
        [PutSpec("b", "kv", k, bytes([k]), f"k{k}".encode()) for k in range(12)], timeout_s=10))
    got = []
    for _ in range(12):
        got.append((await b.recv_notify(timeout_s=5)).notify)
    assert await asyncio.wait_for(batch, 5) == [None] * 12
    assert got == [f"k{k}".encode() for k in range(12)]


# ------------------------------------------------------------------ shm fast path, fabric timing

SLOW = FabricConfig(servers=1, npus_per_server=4, ub_bandwidth_gbps=0.02)   # (GB/s) 512 KiB: ~26 ms


@pytest.fixture
def table_path():
    p = f"/dev/shm/xds-test-putmany-{uuid.uuid4().hex[:8]}"
    yield p
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _lone_delay(nbytes: int, src: int, dst: int) -> float:
    """What the fabric grants one transfer alone on an idle fabric: a lower bound for any put."""
    model = FabricModel(SLOW, time.monotonic())
    return model.reserve(TransferRequest(src, dst, nbytes, "ub"), time.monotonic()).delay_s


@pytest.mark.parametrize("xnet", ["shm"], indirect=True)
async def test_shm_batch_is_never_seen_before_the_fabric_delay_and_a_down_link_fails_only_its_put(
        xnet: XNet, table_path: str):
    topo = Topology(SLOW)
    table = LinkTable.create(table_path, len(topo.links), topo.npus, SLOW)
    owner = FabricModel(SLOW, time.monotonic(), table=table)
    client = await FabricClient.connect(f"ipc:///tmp/xds-nobody-{uuid.uuid4().hex[:6]}", name="a", npu=0,
                                        timeout_s=0.2, allow_unreachable=True, table_path=table_path)
    try:
        assert client.local
        a = await xnet.open("a", npu=0, fabric=client)
        b = await xnet.open("b", npu=1, windows={"kv": 1 << 20})
        c = await xnet.open("c", npu=2, windows={"kv": 1 << 20})
        d = await xnet.open("d", npu=3, windows={"kv": 1 << 20})
        owner.set_link_state("npu3.rx", False)
        n = 512 * 1024
        block = os.urandom(n)
        arrived: dict[str, float] = {}

        async def watch(ep):
            await ep.recv_notify(timeout_s=5)
            arrived[ep.name] = time.monotonic()

        watchers = [asyncio.create_task(watch(ep)) for ep in (b, c)]
        t0 = time.monotonic()
        out = await a.put_many([PutSpec(p, "kv", 0, block, p.encode()) for p in ("b", "c", "d")], timeout_s=5)
        assert out[0] is None and out[1] is None and isinstance(out[2], LinkDown), out
        await asyncio.gather(*watchers)
        floor = _lone_delay(n, 0, 1)
        assert floor > 0.01
        # Both leave through a's one port: never earlier than alone, and the second after the first.
        assert arrived["b"] - t0 >= floor and arrived["c"] - t0 >= floor, (arrived, t0, floor)
        assert max(arrived.values()) - t0 >= 2 * floor * 0.99, (arrived, t0, floor)
        assert bytes(b.window("kv")[:n]) == block and bytes(c.window("kv")[:n]) == block
        with pytest.raises(XcclTimeout):
            await d.recv_notify(timeout_s=0.05)
        assert client.stats["local_reserves"] == 3 and client.stats["waits"] == 2
    finally:
        await client.close()
        table.close(unlink=True)
