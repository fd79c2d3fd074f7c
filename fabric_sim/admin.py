"""gRPC edge of the admin API (``xds.v1.Fabric``): protobuf in, model calls, protobuf out.

Runs on the same event loop as the data plane, so model access needs no lock. A fault
request the model refuses (``FaultError``) becomes INVALID_ARGUMENT with the model's
message; the simulator stays up.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from fabric_sim import metrics
from fabric_sim.host import HostMonitor
from fabric_sim.model import FabricModel, FaultError
from fabric_sim.service import FabricService
from services.api.xds.v1 import fabric_pb2 as pb
from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc
from services.common.logging import get_logger
from services.common.metrics import exposition

log = get_logger()


class FabricAdmin(pb_grpc.FabricServicer):
    def __init__(self, service: FabricService, host: HostMonitor,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.model: FabricModel = service.model
        self.host = host
        self.clock = clock

    def _ack(self, partition_id: str = "") -> pb.FaultAck:
        return pb.FaultAck(epoch=self.service.epoch, active_faults=self.model.active_faults,
                           partition_id=partition_id)

    async def _fault(self, context: grpc.aio.ServicerContext, what: str, fn: Callable[[], str | None],
                     **fields: object) -> pb.FaultAck:
        try:
            pid = fn()
        except FaultError as exc:
            log.warning("admin.rejected", op=what, error=str(exc), **fields)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}")
            raise AssertionError("unreachable: abort raises") from exc
        log.info("admin.fault", op=what, active_faults=self.model.active_faults, **fields)
        return self._ack(pid or "")

    async def SetLinkState(self, request: pb.SetLinkStateRequest, context) -> pb.FaultAck:
        return await self._fault(context, "SetLinkState",
                                 lambda: self.model.set_link_state(request.link, request.up),
                                 link=request.link, up=request.up)

    async def SetLinkLatency(self, request: pb.SetLinkLatencyRequest, context) -> pb.FaultAck:
        return await self._fault(context, "SetLinkLatency",
                                 lambda: self.model.set_link_latency(request.link, request.added_latency_us),
                                 link=request.link, added_latency_us=request.added_latency_us)

    async def SetLinkBandwidth(self, request: pb.SetLinkBandwidthRequest, context) -> pb.FaultAck:
        return await self._fault(context, "SetLinkBandwidth",
                                 lambda: self.model.set_link_bandwidth(request.link, request.factor),
                                 link=request.link, factor=request.factor)

    async def Partition(self, request: pb.PartitionRequest, context) -> pb.FaultAck:
        a, b = list(request.npus_a), list(request.npus_b)
        return await self._fault(context, "Partition", lambda: self.model.partition(a, b), npus_a=a, npus_b=b)

    async def HealPartition(self, request: pb.HealPartitionRequest, context) -> pb.FaultAck:
        return await self._fault(context, "HealPartition", lambda: self.model.heal_partition(request.partition_id),
                                 partition=request.partition_id)

    async def ClearFaults(self, request: pb.ClearFaultsRequest, context) -> pb.FaultAck:
        return await self._fault(context, "ClearFaults", self.model.clear_faults)

    def host_snapshot(self):
        return self.host.snapshot(self.model.base_latency_s("ub"), self.service.counters.fidelity)

    async def GetTelemetry(self, request: pb.GetTelemetryRequest, context) -> pb.Telemetry:
        now = self.clock()
        c = self.service.counters
        h = self.host_snapshot()
        cfg = self.model.cfg
        return pb.Telemetry(
            epoch=self.service.epoch, time_scale=self.model.scale, uptime_s=self.model.uptime(now),
            servers=cfg.servers, npus_per_server=cfg.npus_per_server,
            registered_clients=len(self.service.clients), requests=c.requests, grants=c.grants,
            refusals=c.refusals, bad_messages=c.bad_messages, bad_requests=c.bad_requests,
            links=[pb.LinkStats(
                name=r.name, plane=r.plane, bandwidth_gbps=r.bandwidth_gbps, latency_us=r.latency_us,
                up=r.up, added_latency_us=r.added_latency_us, bandwidth_factor=r.bandwidth_factor,
                bytes=r.bytes, transfers=r.transfers, refusals=r.refusals, busy_s=r.busy_s,
                utilization=r.utilization) for r in self.model.link_telemetry(now, all_links=request.all_links)],
            partitions=[pb.PartitionInfo(id=p.id, npus_a=p.npus_a, npus_b=p.npus_b)
                        for p in self.model.partitions()],
            host=pb.HostStats(
                keeps_up=h.keeps_up, service_mean_s=h.service_mean_s, service_max_s=h.service_max_s,
                loop_lag_max_s=h.loop_lag_max_s, min_emulated_latency_s=h.min_emulated_latency_s,
                client_waits=h.client_waits, client_late_mean_s=h.client_late_mean_s,
                client_late_max_s=h.client_late_max_s, note=h.note))

    def collect(self) -> list:
        """The simulator's metric families (a prometheus_client collector: the /metrics server
        and GetMetrics both read it at request time)."""
        now = self.clock()
        return metrics.families(links=self.model.link_telemetry(now), counters=self.service.counters,
                                host=self.host_snapshot(), uptime_s=self.model.uptime(now),
                                time_scale=self.model.scale, clients=len(self.service.clients),
                                active_faults=self.model.active_faults)

    async def GetMetrics(self, request: pb.GetMetricsRequest, context) -> pb.Metrics:
        """The process's /metrics text (Prometheus format 0.0.4), over the admin gRPC too."""
        return pb.Metrics(text=exposition().decode())
