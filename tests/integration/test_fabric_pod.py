"""A whole pod keeps serving while its fabric simulator is killed (then restarted), hung, or
stopped cleanly (then started again).

Concurrent SDK streams (greedy and seeded) run; once each has 8 tokens the fabric is killed
with SIGKILL (or stopped with SIGSTOP, held ~3 s, continued; or SIGTERMed). Every stream
finishes equal to the reference engine token for token and tokens keep flowing while the
simulator is gone. Killed or hung, it leaves its shared link table behind: every service keeps
reserving on it, so no transfer goes unmodelled (heartbeat loads: ``fabric_local_reserves``
grows, ``fabric_unmodelled_transfers`` does not), and the restarted simulator takes the same
table over (its link counters include the transfers made meanwhile). Stopped cleanly, it
closes the table: the services fall back to asking it (unmodelled while it is gone, counted),
and map the new table once it is back. Then a fresh request is exact and timed by the table.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from services.api.xds.v1 import fabric_pb2 as pb
from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc
from services.client.sdk import InferenceClient
from services.common.health import probe
from services.common.heartbeat import HeartbeatSubscriber
from services.common.liveness import DetectorConfig, FailureDetector
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.pod.spec import address, fabric_config, services
from tests.faults import proc_state
from tests.pods import TestPod
from tests.waiting import Changed

pytestmark = pytest.mark.integration

PROMPTS = ["Hello, SuperPod", "The quick brown fox", "MoE routes tokens to experts", "xDeepServe",
           "disaggregated prefill and decode", "a longer prompt " * 5]
MAX_TOKENS = 40
WAIT_S = 90.0          # a loaded 2-core host; every wait ends on its condition, not on this
HOLD_S = 3.0           # how long the SIGSTOP is held (a fault's duration, not synchronisation)
XCCL_ROLES = ("attention", "expert", "decode", "prefill", "kvpool")


def sampling_for(i: int) -> dict:
    base = {"max_tokens": MAX_TOKENS}
    if i % 2:
        base |= {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 500 + i}
    return base


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("fab", {"routers": 1, "decode": {"groups": 1}, "experts": {"instances": 2},
                                 "heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0}}) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def expected(reference: ReferenceEngine, rid: str, prompt: str, kw: dict) -> tuple[int, ...]:
    return reference.generate([GenerationRequest(rid, tuple(encode(prompt)), SamplingParams(**kw))])[0].token_ids


class Beats:
    """The latest heartbeat load of every XCCL service; notifies ``changed`` on every beat."""

    def __init__(self, pod: TestPod, changed: Changed) -> None:
        self.names = [s.name for s in services(pod.spec) if s.role in XCCL_ROLES]
        self.sub = HeartbeatSubscriber([address(pod.spec, n, "heartbeat") for n in self.names],
                                       detector=FailureDetector(DetectorConfig(1.0, 3.0)))
        self.load: dict[str, dict[str, float]] = {}
        self.beats: dict[str, int] = dict.fromkeys(self.names, 0)
        self.changed = changed

        def on_beat(beat) -> None:
            self.load[beat.service] = dict(beat.load)
            self.beats[beat.service] += 1
            changed.notify()
        self.sub._on_beat = on_beat

    async def __aenter__(self) -> Beats:
        self.task = asyncio.create_task(self.sub.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def total(self, key: str) -> float:
        return sum(v.get(key, 0.0) for v in self.load.values())

    def unmodelled(self) -> float:
        return self.total("fabric_unmodelled_transfers")

    def all_modelled(self) -> bool:
        return len(self.load) == len(self.names) and all(v.get("fabric_modelled") == 1.0 for v in self.load.values())

    def all_local(self) -> bool:
        return len(self.load) == len(self.names) and all(v.get("fabric_local") == 1.0 for v in self.load.values())


async def table_transfers(pod) -> int:
    """Transfers the simulator's link table has counted (all links; table counters)."""
    async with grpc.aio.insecure_channel(address(pod.spec, "fabric", "fabric_admin")) as ch:
        t = await pb_grpc.FabricStub(ch).GetTelemetry(pb.GetTelemetryRequest(), timeout=5)
    return sum(link.transfers for link in t.links)


class Streams:
    def __init__(self, client: InferenceClient, tag: str, changed: Changed) -> None:
        self.ids = [f"{tag}-{i}" for i in range(len(PROMPTS))]
        self.tokens: dict[str, list[int]] = {rid: [] for rid in self.ids}
        self.finished: set[str] = set()
        self.last_finish = 0.0
        self.changed = changed
        self.tasks = [asyncio.create_task(self._run(client, rid, PROMPTS[i], sampling_for(i)))
                      for i, rid in enumerate(self.ids)]

    async def _run(self, client, rid, prompt, kw) -> None:
        async for d in client.generate(prompt, request_id=rid, **kw):
            self.tokens[rid] += d.token_ids
            if d.finish_reason:
                self.finished.add(rid)
                self.last_finish = time.monotonic()
            self.changed.notify()

    def all_have(self, n: int) -> bool:
        return all(len(t) >= n or rid in self.finished for rid, t in self.tokens.items())

    def total(self) -> int:
        return sum(len(t) for t in self.tokens.values())


async def fault_mid_stream(pod, reference, tag: str, inject, recover, *, table_survives: bool) -> None:
    changed = Changed()
    async with InferenceClient(pod.routers, timeout_s=WAIT_S) as client, Beats(pod, changed) as beats:
        await changed.until(lambda: beats.all_modelled() and beats.all_local(), WAIT_S)
        transfers0 = await table_transfers(pod)
        streams = Streams(client, tag, changed)
        await changed.until(lambda: streams.all_have(8), WAIT_S)
        assert len(streams.finished) < len(streams.ids), "streams finished before the fault"
        at_fault = streams.total()
        t_fault, unmodelled0 = time.monotonic(), beats.unmodelled()
        local0 = beats.total("fabric_local_reserves")
        await inject(changed, streams, beats)
        assert streams.total() > at_fault   # tokens flowed while the simulator was gone
        if table_survives:   # ... and were timed by the table it left
            await changed.until(lambda: beats.total("fabric_local_reserves") > local0, WAIT_S)
            assert beats.unmodelled() == unmodelled0 and beats.all_modelled() and beats.all_local()
        else:                # ... unmodelled, counted
            await changed.until(lambda: beats.unmodelled() > unmodelled0 and not beats.all_local(), WAIT_S)
        await recover()
        await asyncio.wait_for(asyncio.gather(*streams.tasks), WAIT_S)
        print(f"\nfabric {tag}: last stream finished {streams.last_finish - t_fault:.2f}s after the fault; "
              f"{int(beats.unmodelled() - unmodelled0)} transfers unmodelled, "
              f"{int(beats.total('fabric_local_reserves') - local0)} reserved on the table")
        for i, rid in enumerate(streams.ids):
            assert streams.tokens[rid] == list(expected(reference, rid, PROMPTS[i], sampling_for(i))), rid

        # Back: every service reserves on the (new) simulator's table again.
        await changed.until(lambda: beats.all_modelled() and beats.all_local(), WAIT_S)
        before = beats.unmodelled()
        transfers1 = await table_transfers(pod)
        if table_survives:   # the same table, taken over: it counted the outage's transfers
            assert transfers1 > transfers0
        rid = f"{tag}-fresh"
        res = await client.complete("a fresh request after the outage", request_id=rid, max_tokens=12)
        assert res.token_ids == expected(reference, rid, "a fresh request after the outage", {"max_tokens": 12})
        assert await table_transfers(pod) > transfers1
        counts = dict(beats.beats)   # wait for a beat of every service sent after the fresh request
        await changed.until(lambda: all(beats.beats[n] > counts[n] + 1 for n in counts), WAIT_S)
        assert beats.unmodelled() == before, "transfers of the fresh request went unmodelled"


async def test_fabric_killed_mid_stream_streams_exact_and_restart_resumes_timing(pod, reference):
    old_pid = pod.pids()["fabric"]

    async def inject(changed, streams, beats):
        pod.kill("fabric")
        assert proc_state(old_pid) == "", "the fabric simulator must be gone"
        # Every stream finishes with no simulator at all.
        await asyncio.wait_for(asyncio.gather(*streams.tasks), WAIT_S)

    async def recover():
        child = await asyncio.to_thread(pod.start_service, "fabric")
        assert child.proc.pid != old_pid
        assert child.info["admin_address"] == address(pod.spec, "fabric", "fabric_admin")
        assert probe(address(pod.spec, "fabric", "health")) == "SERVING"

    await fault_mid_stream(pod, reference, "kill", inject, recover, table_survives=True)


async def test_fabric_stopped_mid_stream_streams_exact_and_continue_resumes_timing(pod, reference):
    pid = pod.pids()["fabric"]

    async def inject(changed, streams, beats):
        os.kill(pid, signal.SIGSTOP)
        try:
            # Signal delivery is asynchronous: re-check on every token and beat (they keep coming).
            await changed.until(lambda: proc_state(pid) == "T", WAIT_S)
            t0 = time.monotonic()
            at_stop = streams.total()
            await changed.until(lambda: streams.total() > at_stop, WAIT_S)
            left = HOLD_S - (time.monotonic() - t0)
            if left > 0:
                await asyncio.sleep(left)   # hold the fault for its duration
            assert proc_state(pid) == "T"
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise

    async def recover():
        os.kill(pid, signal.SIGCONT)

    await fault_mid_stream(pod, reference, "stop", inject, recover, table_survives=True)


async def test_fabric_stopped_cleanly_services_fall_back_then_map_the_new_table(pod, reference):
    old_pid = pod.pids()["fabric"]
    table = fabric_config(pod.spec)["table_path"]

    async def inject(changed, streams, beats):
        assert pod.stop_one("fabric") == 0
        assert proc_state(old_pid) == "" and not os.path.exists(table), "a clean stop removes the table"
        await asyncio.wait_for(asyncio.gather(*streams.tasks), WAIT_S)

    async def recover():
        child = await asyncio.to_thread(pod.start_service, "fabric")
        assert child.proc.pid != old_pid and os.path.exists(table)
        assert probe(address(pod.spec, "fabric", "health")) == "SERVING"

    await fault_mid_stream(pod, reference, "term", inject, recover, table_survives=False)
