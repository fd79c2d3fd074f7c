"""Expert failover in a whole pod (real processes, SDK over gRPC): an expert instance killed
(-9) or hung (SIGSTOP) while streams run costs a re-dispatch to its replica, every stream still
equals the reference engine token for token, and the instance is used again once it is back;
with both holders of an expert dead, a request fails UNAVAILABLE naming it, and succeeds again
after a restart. Every fault proves itself (PID gone, state T) before recovery is believed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from services.client.errors import Unavailable
from services.client.sdk import InferenceClient
from services.common.health import probe
from services.common.liveness import Liveness
from services.model.engine import ReferenceEngine
from services.pod.spec import address
from services.run import EXIT_STALE
from tests.integration.test_pod_e2e import PROMPTS, expected
from tests.loads import Loads
from tests.faults import proc_state
from tests.pods import TestPod
from tests.waiting import Changed

pytestmark = pytest.mark.integration

STREAMS = 8
MAX_TOKENS = 48
FAILOVER_WAIT_S = 2.0


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("xf", {
        "heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0},
        "experts": {"instances": 4, "replicas": 2, "answer_timeout_s": 1.0, "failover_wait_s": FAILOVER_WAIT_S}}) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def params(i: int) -> dict:
    kw = {"max_tokens": MAX_TOKENS}
    if i % 2:
        kw |= {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 500 + i}
    return kw


def assert_gone(pod: TestPod, name: str, pid: int) -> None:
    assert pod.procs[name].poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


class Streams:
    """STREAMS concurrent SDK streams; checks every delta's index (no gap, no duplicate)."""

    def __init__(self, client: InferenceClient, tag: str) -> None:
        self.tag = tag
        self.got: dict[int, list[int]] = {i: [] for i in range(STREAMS)}
        self.changed = Changed()
        self.tasks = [asyncio.create_task(self._one(client, i)) for i in range(STREAMS)]

    def rid(self, i: int) -> str:
        return f"{self.tag}-{i}"

    async def _one(self, client: InferenceClient, i: int) -> str:
        finish = ""
        async for d in client.generate(PROMPTS[i], request_id=self.rid(i), **params(i)):
            if d.token_ids:
                assert d.index == len(self.got[i]), f"stream {i}: index {d.index} after {len(self.got[i])} tokens"
                self.got[i] += d.token_ids
                self.changed.notify()
            finish = d.finish_reason or finish
        return finish

    async def all_have(self, n: int, timeout_s: float = 60.0) -> None:
        await self.changed.until(lambda: all(len(t) >= n for t in self.got.values()), timeout_s)
        assert not any(t.done() for t in self.tasks), "a stream finished before the fault: nothing was tested"

    async def check(self, reference: ReferenceEngine, fault_at: float, timeout_s: float = 90.0) -> None:
        finishes = await asyncio.wait_for(asyncio.gather(*self.tasks), timeout_s)
        print(f"\n{self.tag}: {time.monotonic() - fault_at:.2f} s from the fault to the last stream's finish")
        for i in range(STREAMS):
            assert finishes[i] in ("stop", "length"), f"stream {i} finished {finishes[i]!r}"
            assert tuple(self.got[i]) == expected(reference, self.rid(i), PROMPTS[i], params(i)), f"stream {i}"


async def until_beat(loads: Loads, cond, timeout_s: float) -> None:
    """Re-check ``cond`` at every heartbeat of any service (they arrive every interval)."""
    async def wait():
        while not cond():
            await loads._beats.get()
    await asyncio.wait_for(wait(), timeout_s)


async def attention_uses(pod: TestPod, loads: Loads, rank: int, timeout_s: float = 15.0) -> None:
    """Every attention rank has expert rank ``rank`` back in its dispatch (its heartbeat says)."""
    names = [f"attention-{g}-0" for g in range(pod.spec.decode.groups)]
    async def wait():
        for n in names:
            while int((await loads.fresh(n))["experts_out_mask"]) & (1 << rank):
                pass
    await asyncio.wait_for(wait(), timeout_s)


async def expert_failures(pod: TestPod, loads: Loads) -> int:
    return sum([int((await loads.fresh(f"attention-{g}-0"))["expert_failures"]) for g in range(pod.spec.decode.groups)])


async def fresh_request_is_exact(client: InferenceClient, reference: ReferenceEngine, rid: str) -> None:
    prompt = "a fresh request after the fault " * 2
    res = await client.complete(prompt, request_id=rid, max_tokens=24)
    assert res.token_ids == expected(reference, rid, prompt, {"max_tokens": 24})


async def restart(pod: TestPod, name: str) -> int:
    old = pod.procs[name].pid
    child = await asyncio.to_thread(pod.start_service, name)
    assert child.proc.pid != old and probe(address(pod.spec, name, "health")) == "SERVING"
    return child.proc.pid


async def test_kill9_of_an_expert_mid_stream_fails_over_to_its_replica(pod, reference) -> None:
    name = "expert-1"
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        failures0 = await expert_failures(pod, loads)
        streams = Streams(client, "kill")
        await streams.all_have(8)
        pid = pod.procs[name].pid
        fault_at = time.monotonic()
        pod.kill(name)
        assert_gone(pod, name, pid)
        await streams.check(reference, fault_at)
        assert await expert_failures(pod, loads) > failures0, "no attention rank noticed the dead instance"

        await restart(pod, name)
        await attention_uses(pod, loads, 1)
        before = (await loads.fresh(name))["rows_served"]
        await fresh_request_is_exact(client, reference, "kill-fresh")
        await until_beat(loads, lambda: loads.sub.latest[name].load["rows_served"] > before, 10)


async def test_sigstop_of_an_expert_mid_stream_fails_over_and_late_answers_are_dropped(pod, reference) -> None:
    name = "expert-2"
    pid = pod.procs[name].pid
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        await attention_uses(pod, loads, 2)
        await until_beat(loads, lambda: name in loads.sub.latest, 10)   # the test's detector knows it
        streams = Streams(client, "stop")
        await streams.all_have(8)
        fault_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            # We are its parent: waitpid(WUNTRACED) returns once it has stopped (an event, no poll).
            _, status = await asyncio.wait_for(asyncio.to_thread(os.waitpid, pid, os.WUNTRACED), 10)
            assert os.WIFSTOPPED(status) and proc_state(pid) == "T"
            await streams.check(reference, fault_at)
            # Hung past the heartbeat detector's dead-after window: declared dead.
            await until_beat(loads, lambda: loads.sub.detector.state(name) is Liveness.DEAD,
                             3 * pod.spec.heartbeat.dead_after_s + 5)
        finally:
            os.kill(pid, signal.SIGCONT)
        # Continued after its peers declared it dead, it ends its stale incarnation (exit 75):
        # whatever it answered late in between went to abandoned attempts and was dropped by
        # event id (tests/integration/test_dispatch_failover.py proves the dropping on its own).
        assert await asyncio.to_thread(pod.procs[name].wait, 15) == EXIT_STALE
        await restart(pod, name)
        await attention_uses(pod, loads, 2)   # the new incarnation beats: back in
        before = (await loads.fresh(name))["rows_served"]
        await fresh_request_is_exact(client, reference, "stop-fresh")
        await until_beat(loads, lambda: loads.sub.latest[name].load["rows_served"] > before, 10)
    assert pod.procs[name].pid != pid and pod.alive(name)


async def test_both_holders_dead_fails_unavailable_naming_the_expert_then_recovers(pod, reference) -> None:
    # Experts 1 and 5 live on expert-1 and expert-2 only (round robin, 2 replicas).
    pids = {n: pod.procs[n].pid for n in ("expert-1", "expert-2")}
    for n, pid in pids.items():
        pod.kill(n)
        assert_gone(pod, n, pid)
    prompt = "every token of this prompt needs experts " * 2
    async with InferenceClient(pod.routers, timeout_s=120) as client, Loads(pod) as loads:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"routed expert [15] \(held by expert-1, expert-2\)"):
            await client.complete(prompt, request_id="both-dead", max_tokens=24)
        assert time.monotonic() - t0 >= FAILOVER_WAIT_S, "failed before waiting for a restart"
        await restart(pod, "expert-1")
        await attention_uses(pod, loads, 1)
        res = await client.complete(prompt, request_id="both-back", max_tokens=24)
        assert res.token_ids == expected(reference, "both-back", prompt, {"max_tokens": 24})
        await restart(pod, "expert-2")
        await attention_uses(pod, loads, 2)
        await fresh_request_is_exact(client, reference, "both-fresh")
