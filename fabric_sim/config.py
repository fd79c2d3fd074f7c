"""Configuration of the fabric simulator: one frozen dataclass, loaded with ``load_yaml``.

Units: ``*_gbps`` are **gigabytes** per second (1e9 B/s, the unit UB and HBM figures are
quoted in), per direction; ``*_us`` are microseconds of model time. ``time_scale`` dilates
model time into wall time (wall = model x time_scale): with time_scale 1000 a 2 us hop takes
2 ms of wall time, which the host's timers can actually honour (MEASUREMENTS.md).

Defaults follow the CloudMatrix384 shape: 48 servers x 8 NPUs, 392 GB/s of UB per NPU per
direction into a non-blocking two-tier switch (L1 inside a server, L2 across servers), and a
separate 400 Gb/s (= 50 GB/s) RoCE scale-out plane. Latencies are chosen so that a
same-server UB transfer costs ~1.1 us and a cross-server one ~2.0 us of fixed latency, in the
few-microsecond range published for the UB fabric; they are not a calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.config import ConfigError


@dataclass(frozen=True)
class FabricConfig:
    servers: int = 48
    npus_per_server: int = 8
    # NPU <-> L1 port, per direction.
    ub_bandwidth_gbps: float = 392.0
    ub_hop_latency_us: float = 0.3
    # L1 tier: one switch per server; None = non-blocking (npus_per_server x ub_bandwidth_gbps).
    l1_bandwidth_gbps: float | None = None
    l1_latency_us: float = 0.5
    # L2 tier: each server's uplink bundle to the L2 switches, per direction; None = non-blocking.
    l2_bandwidth_gbps: float | None = None
    l2_latency_us: float = 0.2
    # RoCE scale-out plane: one NIC per NPU, per direction; latency is one-way, end to end.
    roce_bandwidth_gbps: float = 50.0
    roce_latency_us: float = 5.0
    time_scale: float = 1.0
    # ZeroMQ ROUTER bind address of the data plane ("tcp://127.0.0.1:0" binds a free port).
    data_address: str = "tcp://127.0.0.1:0"
    admin_host: str = "127.0.0.1"
    admin_port: int = 0
    # gRPC admin + health on a unix socket ("unix:/path") instead of admin_host:admin_port: a
    # fixed address that a restarted simulator binds again (the pod uses it locally).
    admin_unix: str = ""
    # Prometheus /metrics over HTTP on "host:port" (port 0: any free port); empty: none. The URL
    # reported in the ready info names metrics_host (the name others reach it by) if set.
    metrics_address: str = ""
    metrics_host: str = ""
    # The shared link table (a file under /dev/shm, fabric_sim/table.py) that clients mapping it
    # reserve on without a round trip; empty: none, every reservation is a request.
    table_path: str = ""
    # Most data-plane requests answered in one batch (one clock reading, fair sharing).
    max_batch: int = 256

    def __post_init__(self) -> None:
        where = "FabricConfig"
        for name in ("servers", "npus_per_server", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}", "must be >= 1")
        for name in ("ub_bandwidth_gbps", "roce_bandwidth_gbps", "time_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{where}.{name}", f"must be a positive number, got {v!r}")
        for name in ("l1_bandwidth_gbps", "l2_bandwidth_gbps"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{where}.{name}", f"must be a positive number or null, got {v!r}")
        for name in ("ub_hop_latency_us", "l1_latency_us", "l2_latency_us", "roce_latency_us"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{where}.{name}", f"must be >= 0, got {v!r}")
        if not (0 <= self.admin_port <= 65535):
            raise ConfigError(f"{where}.admin_port", f"must be 0..65535, got {self.admin_port}")
        if self.admin_unix and not self.admin_unix.startswith("unix:"):
            raise ConfigError(f"{where}.admin_unix", f"must be a unix:/path address or empty, got {self.admin_unix!r}")
        if not self.data_address.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"{where}.data_address", "must be a tcp://, ipc:// or inproc:// address")

    @property
    def npus(self) -> int:
        return self.servers * self.npus_per_server

    @property
    def l1_capacity_gbps(self) -> float:
        return self.l1_bandwidth_gbps or self.npus_per_server * self.ub_bandwidth_gbps

    @property
    def l2_capacity_gbps(self) -> float:
        return self.l2_bandwidth_gbps or self.npus_per_server * self.ub_bandwidth_gbps
