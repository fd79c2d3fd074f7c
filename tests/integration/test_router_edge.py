"""A real router process (``python -m services.run``) with NO backends: the gRPC edge, the SDK.

Health, reflection, model info, clear refusals of bad input, NOT_FOUND on unknown cancels,
a request with no live backend waiting for one only as long as its deadline (then
DEADLINE_EXCEEDED naming the prefill) or, without a deadline, ``routing.backend_wait_s`` (then
UNAVAILABLE), SDK fail-over from a dead endpoint,
garbage on the heartbeat plane, and a clean SIGTERM exit.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.api.xds.v1 import inference_pb2 as pb
from services.api.xds.v1 import inference_pb2_grpc as pb_grpc
from services.client import InferenceClient, InvalidArgument, NotFound, SyncInferenceClient, Unavailable
from services.client.errors import DeadlineExceeded
from services.pod.spec import address
from tests.pods import TestPod

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0


class Pod(TestPod):
    """A pod spec in a short tmp dir; the tests start routers one by one (routers need no fabric)."""

    @classmethod
    def new(cls, settings: dict | None = None) -> Pod:
        pod = cls.create("xr", {"routing": {"backend_wait_s": 1.0}, **(settings or {})})
        pod.prepare()
        return pod

    @property
    def file(self) -> Path:
        return self.spec_file

    def start_router(self, name: str = "router-0") -> tuple[subprocess.Popen, str]:
        child = self.start_service(name, timeout_s=READY_TIMEOUT_S)
        return child.proc, child.info["grpc"]

    def close(self) -> None:
        self.stop()


@pytest.fixture
def pod() -> Iterator[Pod]:
    p = Pod.new()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def router(pod: Pod) -> str:
    return pod.start_router()[1]


def dead_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_health_reflection_and_model_info(router: str) -> None:
    async with grpc.aio.insecure_channel(router) as ch:
        h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name async for r in refl for s in r.list_services_response.service}
        assert {"xds.v1.Inference", "grpc.health.v1.Health"} <= names
    async with InferenceClient([router], timeout_s=10) as c:
        info = await c.model_info()
    assert (info.model_name, info.vocab_size, info.max_position_embeddings, info.eos_token_id) == \
        ("tiny-seed0", 259, 512, 257)


async def test_bad_input_is_invalid_argument_with_a_clear_message_and_the_router_stays_up(router: str) -> None:
    async with InferenceClient([router], timeout_s=10) as c:
        cases = [("", {}, "prompt is empty"),
                 ("hi", {"top_p": 3.0}, "top_p must be in (0, 1]"),
                 ("hi", {"max_tokens": 100000}, "exceeds the model's limit of 512 positions"),
                 ([256, 999], {}, "prompt token id 999 is outside the vocabulary"),
                 ("hi", {"temperature": -1.0}, "temperature must be a finite number >= 0")]
        for prompt, kw, words in cases:
            with pytest.raises(InvalidArgument) as ei:
                await c.complete(prompt, **kw)
            assert words in ei.value.message and ei.value.status is grpc.StatusCode.INVALID_ARGUMENT
        async with grpc.aio.insecure_channel(router) as ch:   # no prompt at all, straight on the wire
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(), timeout=5):
                    pass
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in ei.value.details()
        assert (await c.model_info()).vocab_size == 259


async def test_cancel_unknown_is_not_found_and_generate_without_backends_waits_only_its_deadline(
        pod: Pod, router: str) -> None:
    async with InferenceClient([router], timeout_s=2.0) as c:
        with pytest.raises(NotFound, match="'nope'"):
            await c.cancel("nope")
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as ei:
            await c.complete("hello", max_tokens=4)
        # The router's own error (not the client's timer): it names what it waited for.
        assert "no prefill service has been heard from" in ei.value.message
        assert 1.5 <= time.monotonic() - t0 < 2.0
    async with grpc.aio.insecure_channel(router) as ch:   # no deadline: routing.backend_wait_s (1 s)
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async for _ in pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="hello")):
                pass
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "waited 1s" in ei.value.details()
        assert "prefill" in ei.value.details() and 1.0 <= time.monotonic() - t0 < 3.0


def test_sdk_fails_over_from_a_dead_endpoint_and_remembers_the_live_one(router: str) -> None:
    dead = dead_endpoint()
    with SyncInferenceClient([dead, router], timeout_s=10) as c:
        assert c.model_info().vocab_size == 259
        assert c._client.endpoints[c._client._good] == router
        with pytest.raises(InvalidArgument):
            c.complete("")
        with pytest.raises(NotFound):
            c.cancel("nope")
    with SyncInferenceClient([dead], timeout_s=10) as c:
        with pytest.raises(Unavailable, match=dead):
            c.model_info()


async def test_garbage_from_peers_does_not_hurt_the_router(pod: Pod, router: str) -> None:
    """A peer publishing garbage (and then valid beats) on prefill-0's heartbeat address, whose
    RPC socket answers garbage and then a refusal: the router stays up, retries the busy prefill
    until the request's deadline, and then fails it naming prefill-0 and its reason."""
    import zmq.asyncio

    from services.common.heartbeat import Beat
    from services.common.rpc import Failed
    from services.common.status import Code
    from services.common.wire import encode

    ctx = zmq.asyncio.Context()
    pub, rpc = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub.setsockopt(zmq.LINGER, 0)
    rpc.setsockopt(zmq.LINGER, 0)
    pub.bind(address(pod.spec, "prefill-0", "heartbeat"))
    rpc.bind(address(pod.spec, "prefill-0", "rpc"))
    calls = 0

    async def beats() -> None:
        for seq in range(1, 1 << 30):
            await pub.send_multipart([b"\x93garbage"])
            await pub.send_multipart([bytes(f) for f in encode(Beat("prefill-0", "prefill", "ep", seq))])
            await asyncio.sleep(0.05)  # the publisher's beat period, not synchronisation

    async def refuse() -> None:
        nonlocal calls
        while True:
            ident, rid, *_ = await rpc.recv_multipart()
            calls += 1
            await rpc.send_multipart([ident, rid, b"\xc1not msgpack"])
            await rpc.send_multipart([ident, rid, *[bytes(f) for f in encode(Failed(Code.UNAVAILABLE, "overloaded"))]])

    tasks = [asyncio.create_task(beats()), asyncio.create_task(refuse())]
    try:
        async with InferenceClient([router], timeout_s=2.0) as c:
            with pytest.raises(DeadlineExceeded) as ei:
                await c.complete("hello", max_tokens=4)
            assert "prefill-0: UNAVAILABLE: overloaded" in ei.value.message and calls >= 2
            assert (await c.model_info()).vocab_size == 259
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pub.close(0)
        rpc.close(0)
        ctx.term()


def test_sigterm_drains_and_exits_cleanly(pod: Pod) -> None:
    p, ep = pod.start_router()
    with SyncInferenceClient([ep], timeout_s=10) as c:
        assert c.model_info().vocab_size == 259
    assert pod.stop_one("router-0") == 0
    assert not (pod.spec.run_path / "router-0.ready").exists()
