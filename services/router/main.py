"""Router process: ``python -m services.run --pod FILE --name router-0``.

Serves ``xds.v1.Inference``, ``grpc.health.v1`` (SERVING once ready, NOT_SERVING while
draining) and server reflection on the pod's grpc address, and the OpenAI-compatible HTTP API
(``services/router/http.py``: same loop, same ``Router.generate``) on its http address; with
port 0 the real ports are in the ready file (``grpc`` and ``http`` keys). Liveness and load
of every backend come from heartbeats only.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.api.xds.v1 import inference_pb2 as pb
from services.api.xds.v1 import inference_pb2_grpc as pb_grpc
from services.common.heartbeat import HeartbeatSubscriber
from services.common.liveness import DetectorConfig, FailureDetector
from services.common.runtime import ServiceRuntime
from services.model.cache import ensure_model
from services.model.config import ModelConfig
from services.pod.spec import PodSpec, address, bind_address, services
from services.router.core import RouterConfig, RouterCore
from services.router.http import HttpFront
from services.router.service import Router

SERVER_STOP_GRACE_S = 1.0
SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)


async def serve(spec: PodSpec, name: str) -> None:
    model_dir = ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir)
    model_cfg = ModelConfig.load(model_dir)
    core = RouterCore(RouterConfig(max_batch=spec.decode.max_batch, kv_block_size=spec.kv_pool.block_size,
                                   vocab_size=model_cfg.vocab_size, backend_wait_s=spec.routing.backend_wait_s,
                                   dead_after_s=spec.heartbeat.dead_after_s, max_waiting=spec.routing.max_waiting,
                                   retain_finished_s=spec.routing.retain_finished_s,
                                   max_requests=2 * spec.routing.max_waiting + 4096, name=name))
    async with ServiceRuntime(spec, name, xccl=False, load=core.load) as rt:
        router = Router(name, core, model_cfg, model_dir.name, lambda svc: address(spec, svc, "rpc"))
        # Every client stream must reach the router, where it waits in the admission queue (FCFS,
        # with its deadline): HTTP/2's default of 100 concurrent streams per connection would
        # hold the rest in the client's transport, unseen, and a health probe behind them.
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", spec.routing.max_waiting + 1024)])
        pb_grpc.add_InferenceServicer_to_server(router, server)
        # The runtime's health status (NOT_SERVING -> SERVING when ready -> NOT_SERVING while
        # draining), served on the client-facing port too, where load balancers ask.
        health_pb2_grpc.add_HealthServicer_to_server(rt.health.servicer, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        bind = bind_address(spec, name, "grpc")
        port = server.add_insecure_port(bind)
        if port == 0:
            raise RuntimeError(f"{name}: cannot bind gRPC on {bind}")
        await server.start()
        # The OpenAI-compatible HTTP front, on this same loop, over the same Router.generate.
        ready = asyncio.Event()
        front = HttpFront(router, ready=lambda: ready.is_set() and not rt.draining)
        http_bind_host, http_bind_port = bind_address(spec, name, "http").rsplit(":", 1)
        http_port = await front.start(http_bind_host, int(http_bind_port))
        # Only the roles the router's core acts on (backends, and other routers' queues):
        # every beat heard costs a wake-up, and experts/attention/KV pool are watched by
        # the decode masters and attention ranks that use them.
        subscriber = HeartbeatSubscriber(
            [address(spec, s.name, "heartbeat") for s in services(spec)
             if s.name != name and s.role in ("router", "prefill", "decode")],
            detector=FailureDetector(DetectorConfig(spec.heartbeat.suspect_after_s, spec.heartbeat.dead_after_s)),
            on_change=router.on_change, on_beat=router.on_beat)

        async def ready_when_started() -> None:
            await router.started.wait()
            # Ready once every prefill and decode backend has been heard from, or after the
            # dead-after window (a backend down at our start must not keep the router down).
            backends = {s.name for s in services(spec) if s.role in ("prefill", "decode")}
            missing = await router.heard_from(backends, spec.heartbeat.dead_after_s)
            if missing:
                rt.log.warning("router.ready_without", missing=sorted(missing))
            host = address(spec, name, "grpc").rsplit(":", 1)[0]
            http_host = address(spec, name, "http").rsplit(":", 1)[0]
            await rt.mark_ready(grpc=f"{host}:{port}", http=f"http://{http_host}:{http_port}", started_s=time.time())
            ready.set()

        try:
            await rt.run_until_stopped(subscriber.run(), router.run(), ready_when_started(), drain=router.drain)
        finally:
            await front.stop()
            await server.stop(SERVER_STOP_GRACE_S)
