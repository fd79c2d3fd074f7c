"""What every pod service process shares: set-up, readiness, heartbeats, shutdown.

``ServiceRuntime`` is entered once per process. It configures logging for the service's role
and rank, connects the fabric client and opens the service's XCCL endpoint (not for routers),
publishes heartbeats from the service's own event loop, serves its RPC socket and the gRPC
health service (NOT_SERVING -> SERVING once ready -> NOT_SERVING while draining) and its
Prometheus ``/metrics`` (``services.common.metrics``; the URL in the ready info), writes the
ready file (``<run_dir>/<name>.ready``, JSON, atomic) once the service says it is ready, and
turns SIGTERM/SIGINT into a stop event: stop accepting -> drain with a deadline -> exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from services.common.health import HealthServer
from services.common.heartbeat import EXIT_STALE, HeartbeatPublisher, StaleIncarnation, stale_after
from services.common.logging import configure_logging
from services.common.metrics import MetricsServer, sampled
from services.common.rpc import RpcServer
from services.pod.spec import PodSpec, ServiceSpec, address, bind_address, fabric_config, service, services

FABRIC_CONNECT_TIMEOUT_S = 10.0
STALE_EXIT_GRACE_S = 2.0
# A launcher passes the write end of a pipe in this variable; the ready JSON goes there too,
# so the launcher waits on an event (readable pipe, or EOF when the child died) instead of
# polling files.
READY_FD_ENV = "XDS_READY_FD"


def ready_path(spec: PodSpec, name: str) -> Path:
    return spec.run_path / f"{name}.ready"


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def announce_ready(path: Path | None, info: Mapping[str, Any]) -> None:
    """Write the ready file (for people and tools) and tell the launcher through its pipe."""
    if path is not None:
        write_json_atomic(path, info)
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        try:
            os.write(int(fd), (json.dumps(info) + "\n").encode())
            os.close(int(fd))
        except OSError:
            pass  # the launcher is gone; the ready file still tells


async def start_metrics(spec: PodSpec, name: str) -> MetricsServer:
    """The service's /metrics server on the pod's address for it (the URL it reports when ready:
    the address others reach it on, with the port it really got)."""
    server = MetricsServer(bind_address(spec, name, "metrics"),
                           advertise_host=address(spec, name, "metrics").rsplit(":", 1)[0])
    await server.start()
    return server


class ServiceRuntime:
    def __init__(self, spec: PodSpec, name: str, *, windows: Mapping[str, int] | None = None,
                 load: Callable[[], Mapping[str, float]] = dict, xccl: bool = True) -> None:
        self.spec = spec
        self.me: ServiceSpec = service(spec, name)
        self.log = configure_logging(self.me.role, self.me.rank if self.me.group < 0 else self.me.group)
        self._windows = dict(windows or {})
        self._load = load
        self._want_xccl = xccl and self.me.role not in ("router", "fabric")
        self.fabric: Any = None
        self.endpoint: Any = None
        self.heartbeat: HeartbeatPublisher | None = None
        self.rpc: RpcServer | None = None
        self.health: HealthServer | None = None
        self.metrics: MetricsServer | None = None
        self.stopping = asyncio.Event()
        self.draining = False

    async def __aenter__(self) -> ServiceRuntime:
        self.spec.run_path.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)  # the handler only sets an event
        if self._want_xccl:
            from xccl_net.endpoint import EndpointConfig, open_endpoint
            from xccl_net.fabric_client import FabricClient

            # A service (re)started while the simulator is down still comes up: its transfers
            # go unmodelled until the simulator answers a probe (xccl_net/fabric_client.py).
            self.fabric = await FabricClient.connect(address(self.spec, "fabric", "fabric"), name=self.me.name,
                                                     npu=self.me.npu, timeout_s=FABRIC_CONNECT_TIMEOUT_S,
                                                     allow_unreachable=True,
                                                     table_path=fabric_config(self.spec)["table_path"])
            self.endpoint = await open_endpoint(EndpointConfig(
                name=self.me.name, namespace=self.spec.namespace, kind=self.spec.transport, npu=self.me.npu,
                windows=self._windows, bell_dir=str(self.spec.run_path),
                # Any service may talk to any other (KV pool nodes serve every prefill and
                # attention rank): size the peer table from the pod, with headroom for tests/tools.
                max_peers=len(services(self.spec)) + 8), fabric=self.fabric)
        self.health = HealthServer(bind_address(self.spec, self.me.name, "health"))
        await self.health.start()  # NOT_SERVING until mark_ready
        self.metrics = await start_metrics(self.spec, self.me.name)
        sampled("xds:service_load", "The service's heartbeat load figures (what its peers see), by key.",
                lambda: {(k,): float(v) for k, v in self._beat_load().items() if isinstance(v, (int, float))},
                ("key",))
        self.heartbeat = HeartbeatPublisher(
            bind_address(self.spec, self.me.name, "heartbeat"), service=self.me.name, role=self.me.role,
            group=self.me.group, interval_s=self.spec.heartbeat.interval_s, load=self._beat_load,
            stale_after_s=stale_after(self.spec.heartbeat.interval_s, self.spec.heartbeat.dead_after_s),
            on_stale=self._end_stale)
        return self

    def _beat_load(self) -> Mapping[str, float]:
        """The service's load plus its fabric client's (``fabric_unmodelled_transfers``, ...)."""
        load = self._load()
        return {**load, **self.fabric.load()} if self.fabric is not None else load

    def _end_stale(self, exc: StaleIncarnation) -> None:
        """The incarnation must end: cleanly (the exception unwinds the service, which closes
        its sockets and unlinks its segment) if that takes less than ``STALE_EXIT_GRACE_S``,
        else hard (a task that does not yield to cancellation must not keep a dead epoch alive)."""
        timer = threading.Timer(STALE_EXIT_GRACE_S, os._exit, args=(EXIT_STALE,))
        timer.daemon = True
        timer.start()

    def serve_rpc(self, handler: Callable[[Any, bytes], Awaitable[Any]]) -> RpcServer:
        self.rpc = RpcServer(bind_address(self.spec, self.me.name, "rpc"), handler)
        self.rpc.start()
        return self.rpc

    async def mark_ready(self, **info: Any) -> None:
        """Health SERVING first, then the ready file and pipe: ready always means healthy."""
        if self.health is not None:
            await self.health.set(True)
        announce_ready(ready_path(self.spec, self.me.name),
                       {"name": self.me.name, "role": self.me.role, "pid": os.getpid(),
                        "epoch": self.heartbeat.epoch if self.heartbeat else "",
                        **({"metrics": self.metrics.url} if self.metrics else {}), **info})
        self.log.info("service.ready", **info)

    async def run_until_stopped(self, *workers: Awaitable[Any], drain: Callable[[], Awaitable[None]] | None = None,
                                drain_timeout_s: float = 5.0) -> None:
        """Run the heartbeat and ``workers`` until SIGTERM/SIGINT, then drain and return."""
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.heartbeat.run())] + [tg.create_task(w) for w in workers]
            await self.stopping.wait()
            self.log.info("shutdown.drain")
            self.draining = True
            if self.heartbeat:
                self.heartbeat.status = "draining"
            if self.health is not None:
                await self.health.set(False)
            if drain is not None:
                try:
                    await asyncio.wait_for(drain(), drain_timeout_s)
                except asyncio.TimeoutError:
                    self.log.warning("shutdown.drain_timeout", timeout_s=drain_timeout_s)
            for t in tasks:
                t.cancel()

    async def __aexit__(self, *exc: Any) -> None:
        if self.health is not None:
            await self.health.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.rpc is not None:
            await self.rpc.close()
        if self.endpoint is not None:
            await self.endpoint.close()
        if self.fabric is not None:
            await self.fabric.close()
        ready_path(self.spec, self.me.name).unlink(missing_ok=True)
        self.log.info("shutdown.done")
