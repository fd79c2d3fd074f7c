"""The simulator as a real process: data plane via FabricClient, admin via gRPC, crashes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

import grpc
import msgpack
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabric_sim.config import FabricConfig
from fabric_sim.launch import SimProcess, start_sim, start_sim_from
from fabric_sim.model import FabricModel, Grant, TransferRequest
from fabric_sim.protocol import BAD_MESSAGE, Failed
from services.api.xds.v1 import fabric_pb2 as pb
from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc
from services.common.config import from_mapping
from services.common.wire import decode
from tests.waiting import Changed
from xccl_net.errors import FabricUnavailable, LinkDown
from xccl_net.fabric_client import FabricClient

pytestmark = pytest.mark.integration

MB = 1_000_000
# time_scale 1000: a 1 MB same-server transfer is ~3.7 ms of wall time, far above host noise.
CONFIG = dict(servers=2, npus_per_server=4, time_scale=1000.0, data_address="tcp://127.0.0.1:0",
              admin_port=0)


def expected(src: int, dst: int, nbytes: int) -> float:
    out = FabricModel(from_mapping(FabricConfig, CONFIG), now=0.0).reserve(TransferRequest(src, dst, nbytes), 0.0)
    assert isinstance(out, Grant)
    return out.delay_s


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> SimProcess:
    p = start_sim(tmp_path_factory.mktemp("fab"), CONFIG)
    yield p
    assert p.stop() == 0, "SIGTERM must exit 0"


@pytest.fixture
async def admin(sim):
    async with grpc.aio.insecure_channel(sim.admin_address) as ch:
        stub = pb_grpc.FabricStub(ch)
        yield stub
        await stub.ClearFaults(pb.ClearFaultsRequest(), timeout=5)


@pytest.fixture
async def client(sim):
    c = await FabricClient.connect(sim.data_address, name="test", npu=0, deadline_s=5.0)
    yield c
    await c.close()


async def test_ready_file_reports_bound_ports_and_health_serves(sim):
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", sim.data_address) and not sim.data_address.endswith(":0")
    assert sim.info["admin_port"] > 0 and sim.info["pid"] == sim.pid
    async with grpc.aio.insecure_channel(sim.admin_address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="xds.v1.Fabric"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reserve_matches_model_and_wait_is_never_early(client):
    for dst, nbytes in ((1, MB), (4, 2 * MB), (2, 0)):
        delay = await client.reserve(dst, nbytes)
        assert delay == pytest.approx(expected(0, dst, nbytes), rel=1e-9)
        deliver_at = time.monotonic() + delay
        await client.wait_until(deliver_at)
        assert time.monotonic() >= deliver_at
    assert client.stats["grants"] == 3 and client.stats["last_rtt_s"] > 0
    assert client.stats["waits"] == 3 and client.stats["wait_late_max_s"] >= 0


async def test_concurrent_reservations_contend(sim):
    # A generous deadline: this measures contention, not outage detection, on a loaded host.
    async with await FabricClient.connect(sim.data_address, name="burst", npu=3, deadline_s=5.0) as c:
        alone = expected(3, 2, MB)

        async def completes_at() -> float:
            # A delay counts from its reply; reply time + delay is the completion time on our
            # clock, so a loaded host's slow replies cannot eat the margin.
            delay = await c.reserve(2, MB)
            return time.monotonic() + delay

        t0 = time.monotonic()
        ends = await asyncio.gather(*(completes_at() for _ in range(4)))
    # Four transfers through npu3.tx: whichever way they were batched, the last ends ~4x later
    # than one alone, counted from before the first was asked for.
    xfer = alone - expected(3, 2, 0)
    assert max(ends) - t0 >= expected(3, 2, 0) + 4 * xfer * 0.95


async def test_link_down_refuses_promptly_and_heal_restores(client, admin):
    ack = await admin.SetLinkState(pb.SetLinkStateRequest(link="npu1.rx", up=False), timeout=5)
    assert ack.active_faults == 1
    t0 = time.monotonic()
    with pytest.raises(LinkDown) as info:
        await client.reserve(1, MB, timeout_s=2.0)
    assert info.value.link == "npu1.rx" and time.monotonic() - t0 < 1.0
    await client.reserve(5, MB)  # other paths are unaffected
    await admin.SetLinkState(pb.SetLinkStateRequest(link="npu1.rx", up=True), timeout=5)
    assert await client.reserve(1, MB) > 0

    ack = await admin.Partition(pb.PartitionRequest(npus_a=[0, 1], npus_b=[6]), timeout=5)
    with pytest.raises(LinkDown) as info:
        await client.reserve(6, 1)
    assert info.value.link == ack.partition_id
    await admin.ClearFaults(pb.ClearFaultsRequest(), timeout=5)
    await client.reserve(6, 1)


async def test_chaos_tool_heals_one_partition_and_leaves_the_others(sim, client):
    """HealPartition lifts one partition by id; the chaos tool's Fabric uses it and reads back
    that the other partition and a link fault are still in force."""
    from services.chaos.faults import Fabric, LinkFault

    fab = Fabric(sim.admin_address)
    try:
        assert "partition#" in await fab.inject(0, LinkFault(npus_a=(0, 1), npus_b=(6,)))
        await fab.inject(1, LinkFault(npus_a=(0, 1), npus_b=(5,)))
        await fab.inject(2, LinkFault(links=("npu3.rx",), up=False))
        assert "no partition between NPUs [0, 1] and [6]" in await fab.revert(0)
        await client.reserve(6, 1)
        for dst in (5, 3):
            with pytest.raises(LinkDown):
                await client.reserve(dst, 1)
        t = await fab.telemetry()
        assert [(list(p.npus_a), list(p.npus_b)) for p in t.partitions] == [([0, 1], [5])]
        await fab.revert(1)
        await fab.revert(2)
        assert (await fab.telemetry()).partitions == []
        await client.reserve(3, 1)
    finally:
        await fab.stub.ClearFaults(pb.ClearFaultsRequest(), timeout=5)
        await fab.close()


async def test_telemetry_counts_bytes_and_metrics_parse(sim, admin):
    async with await FabricClient.connect(sim.data_address, name="tele", npu=7, deadline_s=5.0) as c:
        before = {link.name: link for link in (await admin.GetTelemetry(pb.GetTelemetryRequest(), timeout=5)).links}
        sizes = [MB, 3 * MB, 12345]
        for n in sizes:
            await c.reserve(6, n)
    tel = await admin.GetTelemetry(pb.GetTelemetryRequest(), timeout=5)
    links = {link.name: link for link in tel.links}
    base = before["npu7.tx"].bytes if "npu7.tx" in before else 0
    assert links["npu7.tx"].bytes - base == sum(sizes)
    assert links["npu7.tx"].busy_s > 0 and 0 < links["npu7.tx"].utilization <= 1
    assert tel.time_scale == 1000.0 and tel.registered_clients >= 1 and tel.host.note
    assert len((await admin.GetTelemetry(pb.GetTelemetryRequest(all_links=True), timeout=5)).links) == 8 * 4 + 2 * 3

    text = (await admin.GetMetrics(pb.GetMetricsRequest(), timeout=5)).text
    samples = parse_prometheus(text)
    assert samples[("xds:fabric_link_bytes_total", (("link", "npu7.tx"), ("plane", "ub")))] == links["npu7.tx"].bytes
    assert samples[("xds:fabric_time_scale", ())] == 1000.0


_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_prometheus(text: str) -> dict[tuple, float]:
    """Strict enough for format 0.0.4: HELP/TYPE before samples, every line well-formed."""
    typed: dict[str, str] = {}
    out: dict[tuple, float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge") and name not in typed
            typed[name] = kind
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, f"bad sample line {line!r}"
        name, labels = m.group(1), ()
        assert name in typed, f"{name} sampled before its TYPE"
        if m.group(3):
            parts = _LABEL.findall(m.group(3))
            assert "".join(f'{k}="{v}"{sep}' for k, v, sep in parts) == m.group(3)
            labels = tuple((k, v) for k, v, _ in parts)
        out[(name, labels)] = float(m.group(4))
    return out


@pytest.mark.parametrize("call, request_, needle", [
    ("SetLinkState", pb.SetLinkStateRequest(link="npu99.tx", up=False), "unknown link 'npu99.tx'"),
    ("SetLinkBandwidth", pb.SetLinkBandwidthRequest(link="npu0.tx", factor=0.0), "factor"),
    ("SetLinkBandwidth", pb.SetLinkBandwidthRequest(link="npu0.tx", factor=float("nan")), "factor"),
    ("SetLinkLatency", pb.SetLinkLatencyRequest(link="srv0.l1", added_latency_us=-3), "added_latency_us"),
    ("Partition", pb.PartitionRequest(npus_a=[0], npus_b=[0, 1]), "overlap"),
    ("Partition", pb.PartitionRequest(npus_a=[0], npus_b=[800]), "out of range"),
    ("HealPartition", pb.HealPartitionRequest(partition_id="partition#999"), "no partition 'partition#999'"),
])
async def test_bad_admin_input_is_invalid_argument_and_sim_keeps_serving(admin, client, call, request_, needle):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(admin, call)(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()
    assert await client.reserve(1, 1000) > 0
    assert (await admin.GetTelemetry(pb.GetTelemetryRequest(), timeout=5)).partitions == []


async def test_garbage_on_data_plane_gets_typed_errors_and_sim_keeps_serving(sim, client, admin):
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, 5000)
    raw.connect(sim.data_address)
    try:
        junk = [[b"\xff\x00garbage"], [b""], [msgpack.packb({"t": "nope", "v": 1, "f": {}, "a": []})],
                [msgpack.packb({"t": "fabric.reserve", "v": 1, "f": {"req_id": "x"}, "a": []})],
                [msgpack.packb({"t": "fabric.granted", "v": 1, "f": {}, "a": []})], [b"a", b"b", b"c"]]
        for frames in junk:
            raw.send_multipart(frames)
        for _ in junk:
            reply = decode(raw.recv_multipart())
            assert isinstance(reply, Failed) and reply.code == BAD_MESSAGE and reply.req_id == -1
    finally:
        raw.close(linger=0)
    # Bytes that are not even ZMTP, straight onto the TCP port.
    host, port = sim.data_address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 4)
    assert await client.reserve(1, 1000) > 0
    tel = await admin.GetTelemetry(pb.GetTelemetryRequest(), timeout=5)
    assert tel.bad_messages >= len(junk)


async def test_bad_request_from_client_is_typed(client):
    from xccl_net.errors import PeerUnreachable
    with pytest.raises(PeerUnreachable, match="out of range"):
        await client.reserve(999, 10)
    with pytest.raises(ValueError):
        await client.reserve(1, -1)
    assert await client.reserve(1, 10) > 0


async def test_ideal_fabric_needs_no_simulator():
    c = await FabricClient.connect(None, name="ideal", npu=3)
    assert c.is_ideal and c.npu == 3
    assert await c.reserve(5, 10 * MB) == 0.0
    await c.close()


@pytest.fixture
def own_sim(tmp_path_factory):
    """A simulator on an ipc:// address that the test may kill and restart."""
    d: Path = tmp_path_factory.mktemp("fk")
    procs: list[SimProcess] = []
    cfg = {**CONFIG, "data_address": f"ipc://{d}/f.sock"}

    def start() -> SimProcess:
        p = start_sim(d, cfg) if not procs else start_sim_from(
            procs[0].config_path, procs[0].ready_file, procs[0].stderr_path)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


async def test_unreachable_sim_fails_connect_in_time(tmp_path_factory):
    d = tmp_path_factory.mktemp("nosim")
    t0 = time.monotonic()
    with pytest.raises(FabricUnavailable):
        await FabricClient.connect(f"ipc://{d}/none.sock", name="x", npu=0, timeout_s=0.3)
    assert time.monotonic() - t0 < 1.5


async def test_sim_killed_then_restarted_same_client_recovers(own_sim):
    first = own_sim()
    # A long deadline: a killed simulator must be noticed by its closed connection, not by time.
    c = await FabricClient.connect(first.data_address, name="survivor", npu=1, deadline_s=3.0)
    changed = Changed()
    c.watchers.append(changed.notify)
    try:
        epoch0 = c.epoch
        assert await c.reserve(2, MB) > 0
        first.kill()
        assert not Path(f"/proc/{first.pid}").exists()
        # A reservation in flight (or sent just after the kill) goes on unmodelled: no error.
        t0 = time.monotonic()
        assert await c.reserve(2, MB) == 0.0
        assert time.monotonic() - t0 < 1.0 and not c.modelled
        assert c.stats["last_outage_reason"] == "connection to the simulator closed"
        # From then on no reservation waits for the dead simulator.
        t0 = time.monotonic()
        assert await asyncio.gather(*(c.reserve(2, 10) for _ in range(5))) == [0.0] * 5
        assert time.monotonic() - t0 < 0.1
        assert c.stats["unmodelled_transfers"] == 6 and c.stats["outages"] == 1 and c.stats["disconnects"] == 1

        second = own_sim()
        assert second.data_address == first.data_address and second.pid != first.pid
        # The background probe registers with the new process: wait for that event, with a deadline.
        await changed.until(lambda: c.modelled, timeout_s=5)
        assert c.epoch not in (None, epoch0) and c.epoch == second.info["epoch"]
        delay = await c.reserve(2, MB)
        assert delay == pytest.approx(expected(1, 2, MB), rel=1e-9)  # nothing stale was delivered
        unmodelled = c.stats["unmodelled_transfers"]
        assert await c.reserve(2, 1) > 0 and c.stats["unmodelled_transfers"] == unmodelled
    finally:
        await c.close()


async def test_hung_sim_is_noticed_by_the_deadline_and_continued_one_resumes(own_sim):
    sim = own_sim()
    c = await FabricClient.connect(sim.data_address, name="patient", npu=1, deadline_s=0.2, probe_interval_s=0.05)
    changed = Changed()
    c.watchers.append(changed.notify)
    try:
        assert await c.reserve(2, MB) > 0
        os.kill(sim.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            # Reservations in flight when it hung: released together at the first deadline.
            results = await asyncio.gather(*(c.reserve(2, MB) for _ in range(4)))
            assert results == [0.0] * 4 and time.monotonic() - t0 < 1.0
            assert Path(f"/proc/{sim.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
            assert c.stats["unmodelled_transfers"] == 4 and c.stats["unavailable"] >= 1 and c.stats["disconnects"] == 0
            assert c.stats["last_outage_reason"].startswith("did not answer")
            strays = c.stats["stray_replies"]
        finally:
            os.kill(sim.pid, signal.SIGCONT)
        # Its late answers to the 4 abandoned reservations arrive (after its probe ack, in
        # another batch) and are discarded as strays, never taken for answers to new requests.
        await changed.until(lambda: c.modelled and c.stats["stray_replies"] >= strays + 4, timeout_s=5)
        assert c.stats["in_flight"] == 0
        assert await c.reserve(2, 1) > 0 and c.stats["unmodelled_transfers"] == 4
    finally:
        await c.close()


async def test_client_started_while_sim_is_down_comes_up_unmodelled_then_times(tmp_path_factory):
    d = tmp_path_factory.mktemp("late")
    address = f"ipc://{d}/f.sock"
    c = await FabricClient.connect(address, name="early", npu=1, timeout_s=0.3, allow_unreachable=True,
                                   probe_interval_s=0.05)
    changed = Changed()
    c.watchers.append(changed.notify)
    sim = None
    try:
        assert not c.modelled and c.epoch is None
        assert await c.reserve(2, MB) == 0.0 and c.stats["unmodelled_transfers"] == 1
        sim = start_sim(d, {**CONFIG, "data_address": address})
        await changed.until(lambda: c.modelled, timeout_s=5)
        assert c.epoch == sim.info["epoch"]
        assert await c.reserve(2, MB) == pytest.approx(expected(1, 2, MB), rel=1e-9)
    finally:
        await c.close()
        if sim is not None:
            assert sim.stop() == 0
