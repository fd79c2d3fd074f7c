"""Router and prefill faults on a real pod (issue 11 items 5, 6, 7): every stream exact.

- kill -9 of a router mid-stream: the SDK resumes each stream on the other router, whose
  Admit takes the request over in the decode group (no 30 s token timeout): one replay's time.
- the only prefill killed (then restarted) or hung (SIGSTOP, then SIGCONT): new requests wait
  for it, bounded by their deadline, and complete exact; past the deadline they fail naming it.

Faults prove themselves (PID gone, state 'T' in /proc/PID/stat) before recovery is believed;
waits are on conditions (router logs, stream progress, heartbeats), never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import pytest

from services.client.errors import DeadlineExceeded
from services.client.sdk import InferenceClient
from services.common.health import probe
from services.common.liveness import Liveness
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.run import EXIT_STALE
from tests.loads import Loads
from tests.faults import hang, proc_state, resume
from tests.pods import TestPod

pytestmark = pytest.mark.integration

DEAD_AFTER_S = 1.5
PROMPTS = ["Hello, SuperPod", "The quick brown fox", "a", "MoE routes tokens to experts", "disaggregated",
           "0123456789" * 3, "xDeepServe", "zz", "The KV cache moves", "batch invariance", "?", "CloudMatrix384"]


def sampling_for(i: int) -> dict:
    base = {"max_tokens": 48 + (i * 7) % 17}
    if i % 2:
        base |= {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 500 + i}
    return base


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("fo", {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 0.6, "dead_after_s": DEAD_AFTER_S},
                                "decode": {"max_batch": 16}}) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


def expected(reference: ReferenceEngine, rid: str, prompt: str, kw: dict) -> tuple[int, ...]:
    return reference.generate([GenerationRequest(rid, tuple(encode(prompt)), SamplingParams(**kw))])[0].token_ids


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def log_has(pod: TestPod, name: str, event: str, **fields) -> bool:
    """A JSON log line of ``name`` with this event (and these field values)."""
    path = pod.spec.run_path / f"{name}.log"
    for line in path.read_text(errors="replace").splitlines():
        if event not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event and all(rec.get(k) == v for k, v in fields.items()):
            return True
    return False


async def until(cond, timeout_s: float, poll_s: float = 0.05) -> None:
    """Poll a condition on files/processes of other processes (no event to wait on), bounded."""
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(poll_s)


class Stream:
    """One SDK stream: its deltas checked for duplicate / missing indices as they come."""

    def __init__(self, client: InferenceClient, rid: str, prompt: str, kw: dict) -> None:
        self.rid, self.prompt, self.kw = rid, prompt, kw
        self.tokens: list[int] = []
        self.finish = ""
        self.done_s = 0.0
        self.progress = asyncio.Event()
        self.task = asyncio.create_task(self._run(client))

    async def _run(self, client: InferenceClient) -> None:
        async for d in client.generate(self.prompt, request_id=self.rid, **self.kw):
            assert d.index == len(self.tokens), f"{self.rid}: index {d.index}, have {len(self.tokens)}"
            self.tokens += d.token_ids
            self.finish = d.finish_reason or self.finish
            self.progress.set()
        self.done_s = time.monotonic()


async def test_router_kill_mid_stream_resumes_on_the_other_router_in_one_replay(pod, reference) -> None:
    r0, r1 = pod.routers
    async with InferenceClient([r0], timeout_s=120) as c0, InferenceClient([r1, r0], timeout_s=120) as c1:
        # Streams on router-0 fail over to router-1 (the SDK's endpoint list is [r0] + r1 below).
        c0.endpoints.append(r1)
        streams = [Stream(c0 if i % 2 == 0 else c1, f"rk-{i}", p, sampling_for(i)) for i, p in enumerate(PROMPTS)]

        async def enough() -> None:
            while not all(len(s.tokens) >= 8 for s in streams):
                await asyncio.wait([asyncio.create_task(s.progress.wait()) for s in streams],
                                   return_when=asyncio.FIRST_COMPLETED)
                for s in streams:
                    s.progress.clear()
                for s in streams:
                    assert not s.task.done() or s.finish, f"{s.rid} ended early: {s.task}"
        await asyncio.wait_for(enough(), 60)
        pid = pod.pids()["router-0"]
        t_kill = time.monotonic()
        pod.kill("router-0")
        assert pid_gone(pid), "router-0 still exists after kill -9"
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 60)
        recovery = max(s.done_s for s in streams) - t_kill
        print(f"\nrouter-0 kill -9: last of {len(streams)} streams finished {recovery:.2f}s after the kill")
        for i, s in enumerate(streams):
            assert tuple(s.tokens) == expected(reference, s.rid, s.prompt, s.kw), f"{s.rid} differs"
            assert s.finish in ("stop", "length")
        assert recovery < 15.0, f"streams took {recovery:.1f}s after the kill (a token timeout is 30 s)"
    # router-0 comes back and serves an exact fresh request
    pod.start_service("router-0")
    assert probe(pod.child("router-0").info["grpc"]) == "SERVING"
    new_r0 = pod.child("router-0").info["grpc"]
    async with InferenceClient([new_r0], timeout_s=60) as c:
        res = await c.complete("fresh after the kill", max_tokens=12, request_id="rk-fresh")
    assert res.token_ids == expected(reference, "rk-fresh", "fresh after the kill", {"max_tokens": 12})


async def test_dead_prefill_requests_wait_for_its_restart_and_complete_exact(pod, reference) -> None:
    pid = pod.pids()["prefill-0"]
    pod.kill("prefill-0")
    assert pid_gone(pid)
    async with InferenceClient(pod.routers, timeout_s=60) as c:
        task = asyncio.create_task(c.complete("waiting for a prefill", max_tokens=10, request_id="pk-1"))
        # The router says the request waits for a prefill (after it saw prefill-0 dead).
        await until(lambda: any(log_has(pod, r, "backend.wait", request_id="pk-1") for r in ("router-0", "router-1")),
                    30)
        assert not task.done()
        pod.start_service("prefill-0")
        res = await asyncio.wait_for(task, 60)
    assert res.token_ids == expected(reference, "pk-1", "waiting for a prefill", {"max_tokens": 10})


async def test_hung_prefill_requests_wait_and_complete_after_sigcont(pod, reference) -> None:
    pid = pod.pids()["prefill-0"]
    os.kill(pid, signal.SIGSTOP)
    try:
        await until(lambda: proc_state(pid) == "T", 5)   # the stop is delivered asynchronously
        async with InferenceClient(pod.routers, timeout_s=60) as c:
            task = asyncio.create_task(c.complete("a hung prefill", max_tokens=10, request_id="ps-1"))
            # Wait past the dead-after window: the routers declared prefill-0 dead and the request waits.
            await until(lambda: any(log_has(pod, r, "backend.wait", request_id="ps-1")
                                    for r in ("router-0", "router-1")), 30)
            assert not task.done() and proc_state(pid) == "T"
            os.kill(pid, signal.SIGCONT)
            # Continued past the dead-after window, it ends its stale incarnation (exit 75);
            # the request keeps waiting for the restart its supervisor (here: the test) makes.
            assert await asyncio.to_thread(pod.procs["prefill-0"].wait, 15) == EXIT_STALE
            assert not task.done()
            await asyncio.to_thread(pod.start_service, "prefill-0")
            res = await asyncio.wait_for(task, 60)
        assert res.token_ids == expected(reference, "ps-1", "a hung prefill", {"max_tokens": 10})
        # and a fresh request afterwards
        async with InferenceClient(pod.routers, timeout_s=60) as c:
            res = await c.complete("after the hang", max_tokens=6, request_id="ps-2")
        assert res.token_ids == expected(reference, "ps-2", "after the hang", {"max_tokens": 6})
    finally:
        with contextlib.suppress(ProcessLookupError):   # gone already if it ended itself
            os.kill(pid, signal.SIGCONT)


async def test_waiting_past_the_deadline_fails_naming_the_prefill(pod, reference) -> None:
    pid = pod.pids()["prefill-0"]
    os.kill(pid, signal.SIGSTOP)
    try:
        await until(lambda: proc_state(pid) == "T", 5)   # the stop is delivered asynchronously
        async with InferenceClient(pod.routers, timeout_s=3.0 * DEAD_AFTER_S) as c:
            with pytest.raises(DeadlineExceeded) as ei:
                await c.complete("no prefill in time", max_tokens=4, request_id="pd-1")
        assert "prefill-0" in ei.value.message and "deadline" in ei.value.message
    finally:
        with contextlib.suppress(ProcessLookupError):   # gone already if it ended itself
            os.kill(pid, signal.SIGCONT)
    assert await asyncio.to_thread(pod.procs["prefill-0"].wait, 15) == EXIT_STALE   # its stale incarnation ends
    await asyncio.to_thread(pod.start_service, "prefill-0")
    async with InferenceClient(pod.routers, timeout_s=60) as c:
        res = await c.complete("served again", max_tokens=6, request_id="pd-2")
    assert res.token_ids == expected(reference, "pd-2", "served again", {"max_tokens": 6})


async def test_hung_decode_master_is_replayed_and_its_late_pushes_change_nothing(pod, reference) -> None:
    async with InferenceClient(pod.routers, timeout_s=120) as c:
        streams = [Stream(c, f"dh-{i}", p, sampling_for(i)) for i, p in enumerate(PROMPTS[:8])]
        await asyncio.wait_for(until(lambda: all(len(s.tokens) >= 8 for s in streams), 60, poll_s=0.02), 61)
        # Stop a master that is running some of these streams (the heartbeats say which).
        async with Loads(pod) as loads:
            running = {g: (await loads.fresh(f"decode-{g}"))["running"] for g in range(pod.spec.decode.groups)}
        victim = f"decode-{max(running, key=running.get)}"
        assert running[int(victim[-1])] > 0, f"no DP group runs the streams: {running}"
        pid = pod.pids()[victim]
        t_fault = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await until(lambda: proc_state(pid) == "T", 5)
            # Continued only once a router has replayed its requests elsewhere: whatever it
            # then pushes for them is late.
            await until(lambda: any(log_has(pod, r, "request.restart", reason=f"{victim} is dead")
                                    for r in ("router-0", "router-1")), 30)
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 60)
        print(f"\n{victim} SIGSTOP: last stream finished {max(s.done_s for s in streams) - t_fault:.2f}s after the stop")
        for s in streams:
            assert tuple(s.tokens) == expected(reference, s.rid, s.prompt, s.kw), f"{s.rid} differs"
        assert await asyncio.to_thread(pod.procs[victim].wait, 15) == EXIT_STALE   # its stale incarnation ends
        await asyncio.to_thread(pod.start_service, victim)
        res = await c.complete("after the decode hang", max_tokens=8, request_id="dh-fresh")
    assert res.token_ids == expected(reference, "dh-fresh", "after the decode hang", {"max_tokens": 8})


async def test_stream_on_a_hung_router_fails_over_while_it_is_still_stopped(pod, reference) -> None:
    """A SIGSTOPped router keeps its TCP connections open and answers nothing: the SDK notices
    (a stalled stream whose router fails a health check) and resumes on the other router."""
    kw = {"max_tokens": 120}
    async with InferenceClient(pod.routers, timeout_s=60, stall_s=1.0, probe_s=0.5) as c, Loads(pod) as loads:
        # The test's detector must know both routers before one hangs (a SUB socket hears a
        # publisher only some time after connecting): it is what says when the hang has lasted.
        await loads.until(lambda: {"router-0", "router-1"} <= set(loads.sub.latest), 10)
        tokens: list[int] = []
        pid = name = None
        async for d in c.generate("a router that hangs", request_id="rh-1", **kw):
            assert d.index == len(tokens)
            tokens += d.token_ids
            if pid is None and len(tokens) >= 8:
                name = "router-0" if c._owner["rh-1"] == pod.routers[0] else "router-1"
                pid = pod.procs[name].pid
                hang(pid)                                   # verified: stop report + state T
                t_fault = time.monotonic()
        took = time.monotonic() - t_fault
        assert proc_state(pid) == "T", "the stream finished only after the router was continued"
        assert tuple(tokens) == expected(reference, "rh-1", "a router that hangs", kw)
        print(f"\nstream on a hung {name} finished {took:.2f}s after the stop")
        # The hang lasts until its peers declare it dead (the stream may finish sooner): only
        # then is its incarnation stale when it is continued.
        await loads.until(lambda: loads.sub.detector.state(name) is Liveness.DEAD, 3 * DEAD_AFTER_S + 5)
        assert proc_state(pid) == "T"
    resume(pid)
    assert await asyncio.to_thread(pod.procs[name].wait, 15) == EXIT_STALE
    await asyncio.to_thread(pod.start_service, name)
