"""The shared link table (fabric_sim/table.py): one model state that the simulator owns and
every client maps, so a reservation needs no round trip. Real files under /dev/shm and real
processes (a second process is the only way to see the file lock and the shared words)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from fabric_sim.config import FabricConfig
from fabric_sim.model import FabricModel, Grant, Refusal, TransferRequest
from fabric_sim.table import LOCK_WAIT_S, LinkTable, TableError
from fabric_sim.topology import Topology
from xccl_net.errors import LinkDown
from xccl_net.fabric_client import FabricClient

ROOT = Path(__file__).resolve().parents[2]
CFG = FabricConfig(servers=2, npus_per_server=4, time_scale=1000.0)


@pytest.fixture
def path():
    p = f"/dev/shm/xds-test-table-{uuid.uuid4().hex[:8]}"
    yield p
    for leftover in (p, *Path("/dev/shm").glob(Path(p).name + ".*")):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass


def owner(path: str) -> tuple[LinkTable, FabricModel]:
    topo = Topology(CFG)
    table = LinkTable.create(path, len(topo.links), topo.npus, CFG)
    return table, FabricModel(CFG, time.monotonic(), table=table)


def client_model(path: str) -> FabricModel:
    table = LinkTable.attach(path)
    return FabricModel(FabricConfig(**table.config_json()), time.monotonic(), table=table)


def run_py(code: str, *args: str, timeout: float = 60) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_client_mapping_answers_as_the_owner_would_and_shares_contention(path):
    table, sim = owner(path)
    private = FabricModel(CFG, time.monotonic())
    cli = client_model(path)
    now = time.monotonic()
    reqs = [TransferRequest(0, 1, 1 << 20), TransferRequest(2, 1, 1 << 20), TransferRequest(0, 5, 4096)]
    # The same arithmetic as a private model fed the same sequence (client and owner alternate).
    shared = [cli.reserve(reqs[0], now), sim.reserve(reqs[1], now), cli.reserve(reqs[2], now)]
    alone = [private.reserve(r, now) for r in reqs]
    assert [g.delay_s for g in shared] == [g.delay_s for g in alone]
    # The second 1 MiB transfer into npu1 queued behind the first: contention crossed mappings.
    assert shared[1].queue_s > 0
    rx = sim.topo.link("npu1.rx").index
    assert int(sim.table.transfers[rx]) == 2 and int(cli.table.transfers[rx]) == 2
    cli.table.close()
    table.close(unlink=True)


def test_faults_and_partitions_written_by_the_owner_refuse_on_the_client(path):
    table, sim = owner(path)
    cli = client_model(path)
    now = time.monotonic()
    sim.set_link_state("npu1.rx", False)
    out = cli.reserve(TransferRequest(0, 1, 10), now)
    assert isinstance(out, Refusal) and out.link == "npu1.rx"
    pid = sim.partition([0], [5, 6])
    out = cli.reserve(TransferRequest(6, 0, 10), now)
    assert isinstance(out, Refusal) and out.link == pid
    assert isinstance(cli.reserve(TransferRequest(0, 2, 10), now), Grant)
    sim.clear_faults()
    assert isinstance(cli.reserve(TransferRequest(0, 1, 10), now), Grant)
    assert isinstance(cli.reserve(TransferRequest(6, 0, 10), now), Grant)
    assert cli.partitions() == [] and sim.active_faults == 0
    cli.table.close()
    table.close(unlink=True)


def test_two_processes_reserving_the_same_link_serialise_on_it(path):
    """Each process reserves N transfers into npu1 at once; the link's work must add up (no
    update lost between processes) and the last completion be at least all bytes / capacity."""
    table, sim = owner(path)
    n, nbytes = 300, 1 << 16
    code = """
        import sys, time
        from fabric_sim.config import FabricConfig
        from fabric_sim.model import FabricModel, TransferRequest
        from fabric_sim.table import LinkTable
        t = LinkTable.attach(sys.argv[1])
        m = FabricModel(FabricConfig(**t.config_json()), time.monotonic(), table=t)
        last = max(m.reserve(TransferRequest(int(sys.argv[2]), 1, int(sys.argv[4])), time.monotonic()).finish_at
                   for _ in range(int(sys.argv[3])))
        print(last, t.lock_timeouts)
    """
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), path, str(src), str(n), str(nbytes)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True) for src in (0, 2)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    rx = sim.topo.link("npu1.rx")
    cap = rx.bandwidth_Bps / CFG.time_scale
    assert int(table.transfers[rx.index]) == 2 * n
    assert int(table.bytes[rx.index]) == 2 * n * nbytes
    last = max(float(o[0]) for o in outs)
    assert last - t0 >= 2 * n * nbytes / cap * 0.999
    assert sum(int(o[1]) for o in outs) == 0   # nobody had to give up on the lock
    table.close(unlink=True)


def test_a_stopped_lock_holder_delays_others_once_by_at_most_the_lock_wait(path):
    table, _sim = owner(path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, signal, sys
        from fabric_sim.table import LinkTable
        t = LinkTable.attach(sys.argv[1])
        assert t.lock()
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)   # stopped while holding the lock
    """), path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cli = client_model(path)
        t0 = time.monotonic()
        out = cli.reserve(TransferRequest(0, 1, 100), time.monotonic())
        waited = time.monotonic() - t0
        assert isinstance(out, Grant) and cli.table.lock_timeouts == 1
        assert LOCK_WAIT_S <= waited < 1.0
        # The holder is still stopped: the next reservations try once and go on.
        t1 = time.monotonic()
        assert all(isinstance(cli.reserve(TransferRequest(0, 1, 100), time.monotonic()), Grant) for _ in range(20))
        assert time.monotonic() - t1 < LOCK_WAIT_S and cli.table.lock_timeouts == 21
        cli.table.close()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    table.close(unlink=True)


def test_a_restarted_owner_takes_over_the_file_clears_faults_and_a_clean_exit_closes_it(path):
    table, sim = owner(path)
    sim.set_link_state("npu0.tx", False)
    sim.partition([0], [1])
    ino, gen = os.stat(path).st_ino, table.generation
    cli = client_model(path)
    # A killed simulator never closes its table; its successor takes the same file over.
    table2, sim2 = owner(path)
    assert os.stat(path).st_ino == ino and table2.generation == gen + 1 == cli.table.generation
    assert isinstance(cli.reserve(TransferRequest(0, 1, 10), time.monotonic()), Grant)   # faults cleared
    assert cli.table.is_open
    table2.close(unlink=True)
    assert not cli.table.is_open and not os.path.exists(path)
    cli.table.close()
    table.close()


def test_attach_refuses_what_is_not_a_table(path):
    with pytest.raises(FileNotFoundError):
        LinkTable.attach(path)
    Path(path).write_bytes(b"\0" * 8192)
    with pytest.raises(TableError, match="not a link table"):
        LinkTable.attach(path)


async def test_fabric_client_reserves_on_the_table_without_a_simulator_and_raises_link_down(path):
    """No simulator process at all (an address nobody listens on): the client still times
    transfers from the table, and a link the owner took down raises LinkDown."""
    table, sim = owner(path)
    client = await FabricClient.connect(f"ipc:///tmp/xds-nobody-{uuid.uuid4().hex[:6]}", name="t", npu=0,
                                        timeout_s=0.2, allow_unreachable=True, table_path=path)
    try:
        assert client.local and client.modelled
        delay = await client.reserve(1, 1 << 20)
        assert delay > 0 and client.stats["local_reserves"] == 1 and client.stats["unmodelled_transfers"] == 0
        sim.set_link_state("npu1.rx", False)
        with pytest.raises(LinkDown):
            await client.reserve(1, 10)
        table.close(unlink=True)   # the owner's clean exit: the client stops using the table
        assert await client.reserve(2, 10) == 0.0
        assert not client.local and client.stats["unmodelled_transfers"] == 1
    finally:
        await client.close()
