"""What a whole pod survives beyond killed processes (issue 15): pairwise fabric faults, a DP group
cut off from an expert, added latency and bandwidth cuts, stragglers. Real processes, SDK over
gRPC; every stream equals the reference engine token for token; every fault is read back from
the fabric simulator (or the straggler's own read-back) before recovery is believed.

Placement (tiny preset, 8 routed experts on 4 instances, 2 replicas, round robin): expert e on
expert-(e % 4) and expert-((e + 1) % 4), so experts 1 and 5 live on expert-1 and expert-2 only.
"""

from __future__ import annotations

import time

import grpc
import pytest

from services.api.xds.v1 import fabric_pb2 as pb
from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc
from services.client.sdk import InferenceClient
from services.common.admin import get_straggler, set_straggler
from services.common.rpc import RemoteError
from services.common.status import Code
from services.model.engine import ReferenceEngine
from services.pod.spec import service
from tests.integration.test_expert_failover_pod import Streams, until_beat
from tests.loads import Loads
from tests.pods import TestPod

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("sv", {
        "heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0},
        "experts": {"instances": 4, "replicas": 2, "answer_timeout_s": 1.0, "failover_wait_s": 2.0}},
            # A host stall past dead_after_s (other jobs on 2 cores) ends a service's incarnation
            # (exit 75, dead is final per epoch); supervision starts the next one, as `xds up` does.
            supervise=True) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def npu(pod: TestPod, name: str) -> int:
    return service(pod.spec, name).npu


class Fabric:
    """The simulator's admin API; every fault is read back from its telemetry."""

    def __init__(self, pod: TestPod) -> None:
        self.ch = grpc.aio.insecure_channel(pod.fabric_admin)
        self.stub = pb_grpc.FabricStub(self.ch)

    async def __aenter__(self) -> Fabric:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stub.ClearFaults(pb.ClearFaultsRequest())
        assert await self.faults() == ([], []), "faults left behind"
        await self.ch.close()

    async def partition(self, a: list[int], b: list[int]) -> str:
        ack = await self.stub.Partition(pb.PartitionRequest(npus_a=a, npus_b=b))
        parts, _ = await self.faults()
        assert (ack.partition_id, sorted(a), sorted(b)) in parts, f"partition not in force: {parts}"
        return ack.partition_id

    async def clear(self) -> None:
        await self.stub.ClearFaults(pb.ClearFaultsRequest())
        assert await self.faults() == ([], []), "ClearFaults left a fault in force"

    async def faults(self) -> tuple[list, list]:
        t = await self.stub.GetTelemetry(pb.GetTelemetryRequest(all_links=True))
        parts = [(p.id, list(p.npus_a), list(p.npus_b)) for p in t.partitions]
        links = [(ln.name, ln.up, ln.added_latency_us, ln.bandwidth_factor) for ln in t.links
                 if not ln.up or ln.added_latency_us or ln.bandwidth_factor != 1.0]
        return parts, links


def load(loads: Loads, name: str) -> dict[str, float]:
    return loads.sub.latest[name].load


async def test_a_partition_between_one_rank_and_one_instance_costs_that_pair_only(pod, reference) -> None:
    a0, a1, ex = "attention-0-0", "attention-1-0", "expert-1"
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads, Fabric(pod) as fab:
        streams = Streams(client, "pair")
        await streams.all_have(8)
        fault_at = time.monotonic()
        await fab.partition([npu(pod, a0)], [npu(pod, ex)])
        # attention-0-0 steps on: its first put to expert-1 is refused and it cuts that pair.
        await until_beat(loads, lambda: int(load(loads, a0).get("experts_cut_mask", 0)) == 1 << 1, 20)
        await streams.check(reference, fault_at)
        # While the pair stays cut, a second batch (spread over both groups by the routers):
        # attention-1-0 keeps using expert-1, attention-0-0 sends it nothing.
        cut_rows = (await loads.fresh(a0))["rows_to_expert_1"]
        other_rows = (await loads.fresh(a1))["rows_to_expert_1"]
        during = Streams(client, "pair-during")
        await during.check(reference, time.monotonic())
        a0_load, a1_load = await loads.fresh(a0), await loads.fresh(a1)
        assert a1_load["rows_to_expert_1"] > other_rows, a1_load
        assert a0_load["rows_to_expert_1"] == cut_rows, "rows went to an instance the fabric refuses"
        assert a0_load["experts_cut_mask"] == 1 << 1 and a1_load["experts_cut_mask"] == 0
        assert a0_load["experts_cut_off"] == 0 and a0_load["expert_unavailable"] == 0

        await fab.clear()
        # A fabric probe of the healed path brings expert-1 back for attention-0-0, and it is used.
        await until_beat(loads, lambda: load(loads, a0)["experts_cut_mask"] == 0, 10)
        assert load(loads, a0)["pair_heals"] >= 1
        before = load(loads, a0)["rows_to_expert_1"]
        again = Streams(client, "pair-healed")
        await again.check(reference, time.monotonic())
        await until_beat(loads, lambda: load(loads, a0)["rows_to_expert_1"] > before, 10)


async def test_a_group_cut_off_from_an_expert_degrades_its_requests_replay_and_it_comes_back(pod, reference) -> None:
    a1, d1 = "attention-1-0", "decode-1"
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads, Fabric(pod) as fab:
        steps0 = (await loads.fresh(a1))["steps"]
        failed0 = load(loads, a1)["expert_cut_off_steps"]
        streams = Streams(client, "cutoff")
        await streams.all_have(8)
        fault_at = time.monotonic()
        # Experts 1 and 5 live on expert-1 and expert-2 only: group 1 cannot reach them.
        await fab.partition([npu(pod, a1)], [npu(pod, "expert-1"), npu(pod, "expert-2")])
        await until_beat(loads, lambda: loads.sub.latest[d1].status == "degraded", 20)
        assert load(loads, a1)["experts_cut_off"] >= 2   # experts 1 and 5
        await streams.check(reference, fault_at)         # its requests replayed elsewhere, exactly
        a1_load = await loads.fresh(a1)
        assert a1_load["steps"] > steps0 and a1_load["expert_cut_off_steps"] > failed0, \
            "group 1 never failed a step for the cut-off expert: nothing was replayed"

        await fab.clear()
        await until_beat(loads, lambda: loads.sub.latest[d1].status == "serving"
                         and load(loads, a1)["experts_cut_off"] == 0, 10)
        # Back in the routers' choices: a new batch reaches group 1 again, exactly.
        before = load(loads, a1)["steps"]
        again = Streams(client, "cutoff-healed")
        await again.check(reference, time.monotonic())
        await until_beat(loads, lambda: load(loads, a1)["steps"] > before, 10)


async def test_a_link_down_then_latency_and_a_bandwidth_cut_change_timing_never_tokens(pod, reference) -> None:
    e0, a0, e3 = npu(pod, "expert-0"), npu(pod, "attention-0-0"), npu(pod, "expert-3")
    ranks = [f"attention-{g}-0" for g in range(2)]
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads, Fabric(pod) as fab:
        streams = Streams(client, "slowlink")
        await streams.all_have(4)
        # expert-3's UB receive port down: every rank cuts it (pairwise, each on its own put),
        # its rows go to replicas; the link up again, each rank's probe takes it back.
        await fab.stub.SetLinkState(pb.SetLinkStateRequest(link=f"npu{e3}.rx", up=False))
        assert (await fab.faults())[1] == [(f"npu{e3}.rx", False, 0.0, 1.0)]
        await until_beat(loads, lambda: all(int(load(loads, r).get("experts_cut_mask", 0)) & (1 << 3)
                                            for r in ranks), 20)
        await fab.stub.SetLinkState(pb.SetLinkStateRequest(link=f"npu{e3}.rx", up=True))
        assert (await fab.faults())[1] == []
        await until_beat(loads, lambda: all(load(loads, r)["experts_cut_mask"] == 0 for r in ranks), 10)
        await fab.stub.SetLinkLatency(pb.SetLinkLatencyRequest(link=f"npu{e0}.rx", added_latency_us=1000))
        await fab.stub.SetLinkBandwidth(pb.SetLinkBandwidthRequest(link=f"npu{a0}.tx", factor=0.2))
        _, links = await fab.faults()
        assert sorted((n, u, lat, round(f, 6)) for n, u, lat, f in links) == sorted(
            [(f"npu{e0}.rx", True, 1000.0, 1.0), (f"npu{a0}.tx", True, 0.0, 0.2)]), links
        await streams.check(reference, time.monotonic())


async def test_a_one_way_fault_costs_each_rank_one_answer_timeout_not_one_per_step(pod, reference) -> None:
    """expert-3's transmit port down: blocks reach it, its answers cannot come back. Each rank
    waits out one answer timeout, finds the way back refused by a two-way path probe, and cuts
    the pair; the steps after that do not wait for expert-3 again."""
    e3 = npu(pod, "expert-3")
    ranks = [f"attention-{g}-0" for g in range(2)]
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads, Fabric(pod) as fab:
        streams = Streams(client, "oneway")
        await streams.all_have(4)
        fault_at = time.monotonic()
        await fab.stub.SetLinkState(pb.SetLinkStateRequest(link=f"npu{e3}.tx", up=False))
        assert (await fab.faults())[1] == [(f"npu{e3}.tx", False, 0.0, 1.0)]
        await until_beat(loads, lambda: all(int(load(loads, r).get("experts_cut_mask", 0)) & (1 << 3)
                                            for r in ranks), 30)
        await streams.check(reference, fault_at)
        failures = {r: (await loads.fresh(r))["expert_failures"] for r in ranks}
        steps = {r: load(loads, r)["steps"] for r in ranks}
        during = Streams(client, "oneway-during")
        await during.check(reference, time.monotonic())
        for r in ranks:
            now = await loads.fresh(r)
            assert int(now["experts_cut_mask"]) & (1 << 3), (r, now)
            assert now["expert_failures"] == failures[r], f"{r} waited for expert-3's answers again"
        after = [(await loads.fresh(r))["steps"] - steps[r] for r in ranks]
        assert sum(after) > 0, "no step ran while the pair was cut"
        await fab.stub.SetLinkState(pb.SetLinkStateRequest(link=f"npu{e3}.tx", up=True))
        assert (await fab.faults())[1] == []
        await until_beat(loads, lambda: all(load(loads, r)["experts_cut_mask"] == 0 for r in ranks), 10)


async def test_a_straggler_expert_is_read_back_and_ranks_prefer_its_replica(pod, reference) -> None:
    ex = "expert-1"
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        with pytest.raises(RemoteError) as bad:
            await set_straggler(pod.spec, ex, -5)
        assert bad.value.code is Code.INVALID_ARGUMENT and "delay_ms" in bad.value.message
        with pytest.raises(RemoteError) as no:
            await set_straggler(pod.spec, "decode-0", 20)
        assert no.value.code is Code.INVALID_ARGUMENT
        moves0 = sum([load(loads, f"attention-{g}-0").get("replica_moves", 0)
                      if f"attention-{g}-0" in loads.sub.latest else 0 for g in range(2)])
        state = await set_straggler(pod.spec, ex, 20)
        assert (state.service, state.delay_ms, state.unit) == (ex, 20.0, "block")
        try:
            streams = Streams(client, "straggle")
            await streams.check(reference, time.monotonic())
            after = await get_straggler(pod.spec, ex)
            assert after.delay_ms == 20.0 and after.delayed > state.delayed, "the delay never took effect"
            await until_beat(loads, lambda: sum(load(loads, f"attention-{g}-0")["replica_moves"]
                                                for g in range(2)) > moves0, 10)
        finally:
            off = await set_straggler(pod.spec, ex, 0)
        assert off.delay_ms == 0.0
        step_straggler = await set_straggler(pod.spec, "attention-0-0", 5)
        assert step_straggler.unit == "step"
        assert (await set_straggler(pod.spec, "attention-0-0", 0)).delay_ms == 0.0
