"""The simulator process: a ZeroMQ ROUTER data plane + the grpc.aio admin API, one loop.

Lifecycle: bind both sockets -> health SERVING -> write the ready file (atomically) -> serve
until SIGTERM/SIGINT -> health NOT_SERVING, stop reading the data plane, stop gRPC with a
short grace -> exit 0. The signal handler only sets the stop event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import grpc
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from fabric_sim.admin import FabricAdmin
from fabric_sim.config import FabricConfig
from fabric_sim.host import HostMonitor
from fabric_sim.model import FabricModel
from fabric_sim.service import FabricService
from fabric_sim.table import LinkTable
from fabric_sim.topology import Topology
from services.common.metrics import REGISTRY, MetricsServer
from services.common.runtime import announce_ready
from services.common.zmqio import ZmqPump
from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc
from services.common.logging import get_logger

log = get_logger()

SERVICE_NAME = "xds.v1.Fabric"
LAG_PROBE_INTERVAL_S = 0.1
STOP_GRACE_S = 0.5
_LOG_BAD_FIRST = 20  # log the first bad messages in full, then every 1000th


class FabricServer:
    def __init__(self, cfg: FabricConfig, *, ready_file: Path | None = None) -> None:
        self.cfg = cfg
        self.ready_file = ready_file
        self.clock = time.monotonic
        self.epoch = f"{uuid.uuid4().hex[:12]}-{os.getpid()}"
        self.table: LinkTable | None = None
        if cfg.table_path:
            topo = Topology(cfg)
            self.table = LinkTable.create(cfg.table_path, len(topo.links), topo.npus, cfg)
        self.model = FabricModel(cfg, now=self.clock(), table=self.table)
        self.service = FabricService(self.model, self.epoch)
        self.host = HostMonitor()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.info: dict = {}
        self._pump: ZmqPump | None = None
        self._bad_logged = 0

    def _on_batch(self, batch: list[list[bytes]]) -> None:
        t0 = self.clock()
        bad_before = self.service.counters.bad_messages + self.service.counters.bad_requests
        replies = self.service.handle_batch(batch, t0)
        assert self._pump is not None
        for ident, frames in replies:
            self._pump.send([ident, *frames])
        self.host.record_service(self.clock() - t0)
        c = self.service.counters
        bad = c.bad_messages + c.bad_requests
        if bad != bad_before and (self._bad_logged < _LOG_BAD_FIRST or bad % 1000 == 0):
            self._bad_logged += 1
            log.warning("dataplane.bad_input", problem=c.last_problem, bad_messages=c.bad_messages,
                        bad_requests=c.bad_requests)

    async def _probe_loop_lag(self) -> None:
        """Lag = how long a callback waits to run: the loop's responsiveness, not timer slack."""
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            ran = loop.create_future()
            t0 = self.clock()
            loop.call_soon(lambda: ran.done() or ran.set_result(self.clock()))
            self.host.record_loop_lag((await ran) - t0)
            try:
                await asyncio.wait_for(self.stop.wait(), LAG_PROBE_INTERVAL_S)
            except TimeoutError:
                pass

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        grpc_server = grpc.aio.server()
        metrics_server: MetricsServer | None = None
        admin = FabricAdmin(self.service, self.host, self.clock)
        REGISTRY.register(admin)
        try:
            sock.bind(self.cfg.data_address)
            data_address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._pump = ZmqPump(sock, self._on_batch, max_batch=self.cfg.max_batch)
            pb_grpc.add_FabricServicer_to_server(admin, grpc_server)
            health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
            if self.cfg.admin_unix:   # gRPC replaces a stale socket file a killed predecessor left
                grpc_server.add_insecure_port(self.cfg.admin_unix)
                port, admin_address = 0, self.cfg.admin_unix
            else:
                port = grpc_server.add_insecure_port(f"{self.cfg.admin_host}:{self.cfg.admin_port}")
                admin_address = f"{self.cfg.admin_host}:{port}"
            await grpc_server.start()
            if self.cfg.metrics_address:
                metrics_server = MetricsServer(self.cfg.metrics_address, advertise_host=self.cfg.metrics_host or None)
                await metrics_server.start()
            self._pump.start()
            for name in ("", SERVICE_NAME):
                await health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self.info = {"data_address": data_address, "admin_address": admin_address,
                         "table": self.cfg.table_path, "table_generation": self.table.generation if self.table else 0,
                         "admin_port": port, "pid": os.getpid(), "epoch": self.epoch,
                         **({"metrics": metrics_server.url} if metrics_server else {})}
            announce_ready(self.ready_file, self.info)
            log.info("fabric.ready", **self.info, servers=self.cfg.servers,
                     npus_per_server=self.cfg.npus_per_server, time_scale=self.cfg.time_scale)
            self.ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._probe_loop_lag())
                await self.stop.wait()
            log.info("shutdown.drain", requests=self.service.counters.requests)
            for name in ("", SERVICE_NAME):
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        finally:
            if self._pump is not None:
                self._pump.stop()
            sock.close(linger=0)
            await grpc_server.stop(STOP_GRACE_S)
            if metrics_server is not None:
                await metrics_server.stop()
            REGISTRY.unregister(admin)
            if self.table is not None:   # clients fall back to asking (and re-map a successor's)
                self.table.close(unlink=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("shutdown.done")
