"""Chaos: kill -9 or hang (SIGSTOP) one service of every role while 32 streams run.

One supervised pod (the launcher restarts what dies, as ``xds up`` does) serves every case.
Each case starts 32 concurrent SDK streams (greedy and seeded sampling, prompts of mixed
lengths, 64-103 output tokens), injects its fault once every stream has 8 tokens, proves the
fault happened (the PID reaped, or the kernel's stop report and state ``T``), and then asserts:

- every stream finishes, with each index exactly once, equal to the reference engine token for
  token;
- the service came back: a kill is followed by a restart (a new PID, health SERVING); a hung
  service, once continued, finds itself silent past the dead-after window and ends its stale
  incarnation, so it too comes back as a new PID (the fabric simulator, which keeps no
  heartbeat, is simply continued and SERVING);
- a fresh request afterwards equals the reference.

Each case records the seconds from the fault to the last stream's finish (printed, and added
to ``$XDS_CHAOS_RECORD`` as JSON lines when that is set: the README's table comes from there).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import pytest

from services.client.sdk import InferenceClient
from services.common.health import probe
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.pod.spec import address
from tests.faults import crash, hang, proc_state, resume
from tests.pods import TestPod

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

HEARTBEAT = {"interval_s": 0.1, "suspect_after_s": 0.5, "dead_after_s": 1.5}
N_STREAMS = 32
FAULT_AFTER_TOKENS = 8
CASE_TIMEOUT_S = 150.0
ROLES = {"router": "router-0", "prefill": "prefill-0", "kvpool": "kvpool-0", "decode": "decode-0",
         "attention": "attention-0-0", "expert": "expert-1", "fabric": "fabric"}
TEXTS = ["Hello, SuperPod", "MoE routes tokens to experts", "a", "disaggregated prefill and decode ",
         "The KV cache moves over the unified bus. ", "0123456789", "tokens must match the reference",
         "Ünïcödé ✓ "]


def workload() -> list[tuple[str, dict]]:
    """32 requests: prompt lengths 1..~250 bytes; even ones greedy, odd ones seeded sampling
    (a seed makes the draw independent of the request id, so one reference run serves every
    case)."""
    out = []
    for i in range(N_STREAMS):
        prompt = TEXTS[i % len(TEXTS)] * (1 + (i * 5) % 7)
        kw: dict = {"max_tokens": 64 + (i * 13) % 40}
        if i % 2:
            kw |= {"temperature": 0.6 + 0.1 * (i % 5), "top_p": 0.9, "top_k": 30 * (i % 3), "seed": 7000 + i}
        out.append((prompt, kw))
    return out


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("chaos", {"heartbeat": HEARTBEAT}, timeout_s=120, supervise=True) as p:
        yield p


@pytest.fixture(scope="module")
def expected(pod) -> list[tuple[int, ...]]:
    ref = ReferenceEngine.from_dir(pod.model_dir)
    # No EOS stop: the workload's lengths are what the test means (the reference stops on
    # EOS exactly as the pod does, so both sides agree either way).
    reqs = [GenerationRequest(f"ref-{i}", tuple(encode(p)), SamplingParams(**kw)) for i, (p, kw) in enumerate(workload())]
    return [r.token_ids for r in ref.generate(reqs)]


@dataclass
class Stream:
    tokens: list[int] = field(default_factory=list)
    finish: str = ""
    finished_at: float = 0.0
    error: str = ""


class Load:
    """32 streams on the pod; ``reached`` is set once every stream has ``n`` tokens (or ended)."""

    def __init__(self, client: InferenceClient, case: str, n: int) -> None:
        self.client, self.case, self.n = client, case, n
        self.streams = [Stream() for _ in range(N_STREAMS)]
        self.reached = asyncio.Event()

    def _check(self) -> None:
        if all(len(s.tokens) >= self.n or s.finish or s.error for s in self.streams):
            self.reached.set()

    async def _one(self, i: int, prompt: str, kw: dict) -> None:
        s = self.streams[i]
        try:
            async for d in self.client.generate(prompt, request_id=f"{self.case}-{i}", **kw):
                assert d.index == len(s.tokens), f"stream {i}: index {d.index} after {len(s.tokens)} tokens"
                s.tokens += d.token_ids
                if d.finish_reason:
                    s.finish, s.finished_at = d.finish_reason, time.monotonic()
                self._check()
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
            s.error = f"{type(exc).__name__}: {exc}"
            s.finished_at = time.monotonic()
            self._check()

    async def run(self) -> None:
        await asyncio.gather(*(self._one(i, p, kw) for i, (p, kw) in enumerate(workload())))


def health_target(pod: TestPod, name: str) -> str:
    return pod.fabric_admin if name == "fabric" else address(pod.spec, name, "health")


async def serving(pod: TestPod, name: str) -> None:
    assert await asyncio.to_thread(probe, health_target(pod, name)) == "SERVING", name


async def fresh_request_is_exact(pod: TestPod, expected: list[tuple[int, ...]], case: str) -> None:
    prompt, kw = workload()[1]
    async with InferenceClient(pod.routers, timeout_s=60) as client:
        res = await client.complete(prompt, request_id=f"{case}-fresh", **kw)
    assert res.token_ids == expected[1], f"{case}: the fresh request differs from the reference"


async def run_case(pod: TestPod, expected: list[tuple[int, ...]], case: str, faults: list[tuple[str, str]],
                   request: pytest.FixtureRequest) -> float:
    """Run the load, inject ``faults`` [(kind, service)] at once mid-stream, check everything;
    the seconds from the faults to the last stream's finish."""
    for name in {n for _, n in faults}:
        await serving(pod, name)
    old_pids = {name: pod.procs[name].pid for _, name in faults}
    async with InferenceClient(pod.routers, timeout_s=CASE_TIMEOUT_S) as client:
        load = Load(client, case, FAULT_AFTER_TOKENS)
        task = asyncio.create_task(load.run())
        try:
            await asyncio.wait_for(load.reached.wait(), 60)
            assert not task.done(), f"{case}: every stream ended before the fault"
            t_fault = time.monotonic()
            hung = []
            for kind, name in faults:
                if kind == "kill":
                    assert await asyncio.to_thread(crash, pod.procs[name]) == -9      # reaped: PID gone
                else:
                    await asyncio.to_thread(hang, old_pids[name])                    # stop report, state T
                    hung.append(name)
            if hung:
                # Held for three dead-after windows, then continued.
                await asyncio.sleep(3 * HEARTBEAT["dead_after_s"])
                for name in hung:
                    assert proc_state(old_pids[name]) == "T", f"{name} did not stay stopped"
                    await asyncio.to_thread(resume, old_pids[name])
            await asyncio.wait_for(asyncio.shield(task), CASE_TIMEOUT_S)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    errors = {i: s.error for i, s in enumerate(load.streams) if s.error}
    assert not errors, f"{case}: {len(errors)} of {N_STREAMS} streams failed: {errors}"
    for i, s in enumerate(load.streams):
        assert tuple(s.tokens) == expected[i], f"{case}: stream {i} differs from the reference"
        assert s.finish in ("stop", "length"), f"{case}: stream {i} finished {s.finish!r}"
    recovery_s = max(s.finished_at for s in load.streams) - t_fault
    # The service came back.
    for kind, name in faults:
        if name == "fabric" and kind == "stop":
            assert pod.procs[name].pid == old_pids[name] and pod.alive(name)
        else:
            await asyncio.to_thread(pod.wait_restarted, name, old_pids[name], 60)
            assert pod.procs[name].pid != old_pids[name]
        await serving(pod, name)
    await fresh_request_is_exact(pod, expected, case)
    record = {"case": case, "faults": faults, "recovery_s": round(recovery_s, 2), "streams": N_STREAMS}
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():   # into the CI log, even under -q
        print(f"\nchaos {json.dumps(record)}")
    if os.environ.get("XDS_CHAOS_RECORD"):
        with open(os.environ["XDS_CHAOS_RECORD"], "a") as f:
            f.write(json.dumps(record) + "\n")
    return recovery_s


@pytest.mark.parametrize("fault", ["kill", "stop"])
@pytest.mark.parametrize("role", list(ROLES))
async def test_one_fault_mid_stream(pod, expected, role, fault, request) -> None:
    await run_case(pod, expected, f"{role}-{fault}", [(fault, ROLES[role])], request)


async def test_an_expert_and_a_decode_master_killed_at_once(pod, expected, request) -> None:
    await run_case(pod, expected, "expert+decode-kill", [("kill", "expert-2"), ("kill", "decode-1")], request)
