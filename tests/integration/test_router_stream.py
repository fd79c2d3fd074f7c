"""The router's token path between real processes, against a stand-in prefill + decode pair.

The stand-in (``BACKEND`` below, one process) is a test double of the *peers*, not of the
router: it speaks the real protocol (services/protocol/inference.py over services/common/rpc.py),
beats on the real heartbeat plane as prefill-0 and decode-0, and computes real tokens with the
reference engine, one pushed ``Tokens`` per step (``--step-s`` apart so tests can act
mid-stream). The whole pod's path is tested elsewhere; here the router's relay, cancel,
resume, idempotency and the SDK's router fail-over are checked token for token against the
reference engine.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from services.api.xds.v1 import inference_pb2 as pb
from services.client import InferenceClient
from services.model.cache import ensure_model
from services.model.engine import GenerationRequest, ReferenceEngine, prompt_ids
from services.model.sampling import SamplingParams
from tests.integration.test_router_edge import ROOT, Pod

pytestmark = pytest.mark.integration

BACKEND = r"""
import asyncio, sys
from services.common.heartbeat import HeartbeatPublisher
from services.common.rpc import RemoteError, RpcServer
from services.model.cache import ensure_model
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, new_kv
from services.pod.spec import address, load_pod
from services.protocol.inference import Admit, Cancel, KVRef, Prefill, PrefillDone, Subscribe, Tokens

async def main():
    spec, step_s = load_pod(sys.argv[1]), float(sys.argv[2])
    engine = ReferenceEngine.from_dir(ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir))
    seqs, running = {}, {}

    async def prefill(msg, ident):
        if not isinstance(msg, Prefill):
            raise RemoteError("INVALID_ARGUMENT", type(msg).__name__)
        req = GenerationRequest(msg.request_id, tuple(msg.token_ids), msg.sampling.params())
        s = SequenceState(req, new_kv(engine.cfg, len(msg.token_ids) + req.params.max_tokens))
        engine.prefill([s])
        seqs[msg.request_id] = s
        return PrefillDone(msg.request_id, s.output[-1], KVRef(len(msg.token_ids), 16, ()), 0, len(msg.token_ids))

    async def decode_loop(msg, ident):
        s, p, n = seqs[msg.request_id], msg.sampling.params(), msg.generated
        try:
            while True:
                await asyncio.sleep(step_s)
                engine.decode_step([s])
                tok = s.output[-1]
                n += 1
                fin = "stop" if tok in p.stop_token_ids else "length" if n >= p.max_tokens else ""
                decode_srv.push(ident, Tokens(msg.request_id, n - 1, (tok,), fin))
                if fin:
                    return
        finally:
            running.pop(msg.request_id, None)

    async def decode(msg, ident):
        if isinstance(msg, Subscribe):
            print("subscribe", msg.router, flush=True)
            return None
        if isinstance(msg, Cancel):
            t = running.pop(msg.request_id, None)
            if t is not None:
                t.cancel()
                print("cancel", msg.request_id, flush=True)
            return None
        if not isinstance(msg, Admit):
            raise RemoteError("INVALID_ARGUMENT", type(msg).__name__)
        old = running.pop(msg.request_id, None)
        if old is not None:
            old.cancel()
        running[msg.request_id] = asyncio.get_running_loop().create_task(decode_loop(msg, ident))
        return None

    pre_srv = RpcServer(address(spec, "prefill-0", "rpc"), prefill)
    decode_srv = RpcServer(address(spec, "decode-0", "rpc"), decode)
    pubs = [HeartbeatPublisher(address(spec, "prefill-0", "heartbeat"), service="prefill-0", role="prefill",
                               interval_s=spec.heartbeat.interval_s, load=lambda: {"running": 0}),
            HeartbeatPublisher(address(spec, "decode-0", "heartbeat"), service="decode-0", role="decode", group=0,
                               interval_s=spec.heartbeat.interval_s,
                               load=lambda: {"running": len(running), "free_kv_blocks": 100})]
    pre_srv.start()
    decode_srv.start()
    print("ready", flush=True)
    await asyncio.gather(*(p.run() for p in pubs))

asyncio.run(main())
"""


class Backend:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout_s: float = 10.0) -> str:
        return (await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)).decode().strip()

    async def expect(self, want: str, timeout_s: float = 10.0) -> None:
        async def until() -> None:
            while (got := await self.line(timeout_s)) != want:
                assert got, f"backend exited before printing {want!r}"
        await asyncio.wait_for(until(), timeout_s)


@pytest.fixture
async def backend(pod_step) -> AsyncIterator[Backend]:
    pod, step_s = pod_step
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", BACKEND, str(pod.file), str(step_s),
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    try:
        b = Backend(proc)
        assert await b.line(30) == "ready"
        yield b
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture
def pod_step(request):
    # The stand-in never ends a stale incarnation as real services do (nothing would restart
    # it), so a stall of this loaded machine longer than the default 1.5 s window would leave
    # it dead for good and the request waiting out its deadline. Liveness is tested elsewhere;
    # here the window is wide.
    # One DP group: the stand-in's topology (the router is ready once it heard from both).
    pod = Pod.new({"heartbeat": {"interval_s": 0.2, "suspect_after_s": 10.0, "dead_after_s": 30.0},
                   "decode": {"groups": 1}})
    try:
        yield pod, getattr(request, "param", 0.0)
    finally:
        pod.close()


@pytest.fixture(scope="module")
def engine() -> ReferenceEngine:
    return ReferenceEngine.from_dir(ensure_model(None, "tiny", 0))


def reference(engine: ReferenceEngine, rid: str, prompt: str, **kw):
    return engine.generate([GenerationRequest(rid, prompt_ids(prompt), SamplingParams(**kw))])[0]


async def test_streams_match_the_reference_token_for_token(pod_step, backend, engine) -> None:
    pod, _ = pod_step
    _, ep = pod.start_router()
    cases = [("greedy", "Hello, pod", dict(max_tokens=24)),
             ("seeded", "Grüße, 世界", dict(max_tokens=30, temperature=0.8, top_p=0.9, seed=5)),
             ("by-id", "sample me", dict(max_tokens=12, temperature=1.3, top_k=20)),
             ("one", "x", dict(max_tokens=1))]
    async with InferenceClient([ep], timeout_s=60) as c:
        got = await asyncio.gather(*(c.complete(p, request_id=rid, **kw) for rid, p, kw in cases))
        for (rid, p, kw), res in zip(cases, got):
            ref = reference(engine, rid, p, **kw)
            assert (res.token_ids, res.text, res.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), rid
        # Deltas: contiguous indexes, never a split character.
        deltas = [d async for d in c.generate("Grüße, 世界", request_id="seeded", max_tokens=30,
                                               temperature=0.8, top_p=0.9, seed=5)]
        assert [d.index for d in deltas] == [sum(len(x.token_ids) for x in deltas[:i]) for i in range(len(deltas))]
        assert "\ufffd" not in "".join(d.text for d in deltas) or "\ufffd" in got[1].text
    await backend.expect("subscribe router-0")


@pytest.mark.parametrize("pod_step", [0.05], indirect=True)
async def test_cancel_rpc_and_client_disconnect_stop_the_request_at_the_master(pod_step, backend) -> None:
    pod, _ = pod_step
    _, ep = pod.start_router()
    async with InferenceClient([ep], timeout_s=60) as c:
        deltas = []
        async for d in c.generate("cancel me", request_id="c1", max_tokens=400, stop_token_ids=[999 % 259]):
            deltas.append(d)
            if len(deltas) == 3:
                assert await c.cancel("c1") is True
        assert deltas[-1].finish_reason == "cancelled" and len(deltas) >= 4
        await backend.expect("cancel c1")
        async for d in c.generate("leave me", request_id="c2", max_tokens=400):
            if d.index >= 2:
                break                                            # the client goes away mid-stream
        await backend.expect("cancel c2")


@pytest.mark.parametrize("pod_step", [0.03], indirect=True)
async def test_second_stream_on_the_same_id_attaches_and_resumes(pod_step, backend, engine) -> None:
    import grpc

    from services.api.xds.v1 import inference_pb2_grpc as pb_grpc
    pod, _ = pod_step
    _, ep = pod.start_router()
    ref = reference(engine, "r1", "resume", max_tokens=20)
    req = pb.GenerateRequest(request_id="r1", prompt="resume", sampling=pb.SamplingParams(max_tokens=20))
    async with grpc.aio.insecure_channel(ep) as ch:
        stub = pb_grpc.InferenceStub(ch)
        first = stub.Generate(req, timeout=30)
        seen = []
        async for d in first:
            seen += d.token_ids
            if len(seen) >= 4:
                break
        again = pb.GenerateRequest()
        again.CopyFrom(req)
        again.resume_from = 3
        tail = [d async for d in stub.Generate(again, timeout=30)]  # attaches: same run, from index 3
        assert tail[0].index == 3 and tail[-1].finish_reason == "length"
        assert tuple(seen[:3]) + tuple(t for d in tail for t in d.token_ids) == ref.token_ids
        rest = [d async for d in first]                             # the first stream carries on too
        assert tuple(seen) + tuple(t for d in rest for t in d.token_ids) == ref.token_ids
        replay = [d async for d in stub.Generate(req, timeout=30)]  # finished + retained: read again
        assert tuple(t for d in replay for t in d.token_ids) == ref.token_ids


@pytest.mark.parametrize("pod_step", [0.04], indirect=True)
async def test_sdk_resumes_on_another_router_when_its_router_is_killed(pod_step, backend, engine) -> None:
    pod, _ = pod_step
    r0, ep0 = pod.start_router("router-0")
    _, ep1 = pod.start_router("router-1")
    ref = reference(engine, "k1", "survive a router", max_tokens=40, temperature=0.7, seed=11)
    async with InferenceClient([ep0, ep1], timeout_s=60) as c:
        ids, text, routers = [], [], set()
        async for d in c.generate("survive a router", request_id="k1", max_tokens=40, temperature=0.7, seed=11):
            ids += d.token_ids
            text.append(d.text)
            routers.add(c.endpoints[c._good])
            if len(ids) >= 5 and r0.returncode is None:
                r0.send_signal(signal.SIGKILL)
                r0.wait(5)
        assert tuple(ids) == ref.token_ids and "".join(text) == ref.text and d.finish_reason == ref.finish_reason
        assert routers == {ep0, ep1}


async def test_cli_through_the_router_prints_what_the_reference_prints(pod_step, backend) -> None:
    pod, _ = pod_step
    _, ep = pod.start_router()
    flags = ["--prompt", "Hello, pod", "--max-tokens", "12", "--temperature", "0.8", "--seed", "3", "--json"]

    async def run(*args: str) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(sys.executable, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(p.communicate(), 60)
        finally:
            if p.returncode is None:
                p.kill()
                await p.wait()
        return p.returncode, out.decode(), err.decode()

    ref, pod_out, bad = await asyncio.gather(
        run("-m", "services.cli", "generate", "--reference", "--preset", "tiny", *flags),
        run("-m", "services.client.cli", "--endpoint", ep, *flags),
        run("-m", "services.client.cli", "--endpoint", ep, "--prompt", "x", "--top-p", "2"))
    assert ref[0] == 0 and pod_out[0] == 0 and json.loads(pod_out[1]) == json.loads(ref[1])
    assert bad[0] == 2 and "INVALID_ARGUMENT: top_p must be in (0, 1]" in bad[2]


@pytest.mark.parametrize("pod_step", [0.05], indirect=True)
async def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(pod_step, backend, engine) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.client import Unavailable
    pod, _ = pod_step
    proc, ep = pod.start_router()
    ref = reference(engine, "d1", "drain me", max_tokens=30)
    async with InferenceClient([ep], timeout_s=60) as c, grpc.aio.insecure_channel(ep) as ch:
        ids = []
        async for d in c.generate("drain me", request_id="d1", max_tokens=30):
            ids += d.token_ids
            if len(ids) == 2:
                proc.send_signal(signal.SIGTERM)
                health = health_pb2_grpc.HealthStub(ch)

                async def not_serving() -> None:
                    while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != \
                            health_pb2.HealthCheckResponse.NOT_SERVING:
                        await asyncio.sleep(0.01)  # no event crosses the process boundary: poll, bounded
                await asyncio.wait_for(not_serving(), 5)
                with pytest.raises(Unavailable, match="draining"):
                    await c.complete("too late", max_tokens=2)
        assert tuple(ids) == ref.token_ids                      # the in-flight stream finished whole
    assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 10) == 0
