"""Static topology: the links of the emulated SuperPod and the path between two NPUs.

Link names (stable; the admin API and telemetry use them):
- ``npu{i}.tx`` / ``npu{i}.rx``: NPU i's UB port into / out of its server's L1 switch;
- ``srv{s}.l1``: server s's L1 switch tier, one shared resource for all traffic through it;
- ``srv{s}.up`` / ``srv{s}.down``: server s's uplink bundle to / from the L2 tier;
- ``npu{i}.roce.tx`` / ``npu{i}.roce.rx``: NPU i's RoCE NIC, on the separate scale-out plane.

Paths (UB): same server = tx -> l1 -> rx; other server = tx -> l1(src) -> up(src) ->
down(dst) -> l1(dst) -> rx. The L2 tier itself is non-blocking, so only the per-server
uplinks can congest. RoCE: roce.tx -> roce.rx. A transfer to oneself uses no link.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric_sim.config import FabricConfig

PLANES = ("ub", "roce")

GB = 1e9


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    plane: str
    bandwidth_Bps: float  # bytes per second of model time
    latency_s: float  # model seconds, paid once per traversal, not occupying the link


class TopologyError(ValueError):
    """A request names an NPU, plane or link that does not exist."""


class Topology:
    def __init__(self, cfg: FabricConfig) -> None:
        self.cfg = cfg
        self.links: list[Link] = []
        self.by_name: dict[str, Link] = {}
        n = cfg.npus
        ub, hop = cfg.ub_bandwidth_gbps * GB, cfg.ub_hop_latency_us * 1e-6
        roce, roce_half = cfg.roce_bandwidth_gbps * GB, cfg.roce_latency_us * 1e-6 / 2
        self._tx = [self._add(f"npu{i}.tx", "ub", ub, hop) for i in range(n)]
        self._rx = [self._add(f"npu{i}.rx", "ub", ub, hop) for i in range(n)]
        l1_bw, l1_lat = cfg.l1_capacity_gbps * GB, cfg.l1_latency_us * 1e-6
        l2_bw, l2_lat = cfg.l2_capacity_gbps * GB, cfg.l2_latency_us * 1e-6
        self._l1 = [self._add(f"srv{s}.l1", "ub", l1_bw, l1_lat) for s in range(cfg.servers)]
        self._up = [self._add(f"srv{s}.up", "ub", l2_bw, l2_lat) for s in range(cfg.servers)]
        self._down = [self._add(f"srv{s}.down", "ub", l2_bw, l2_lat) for s in range(cfg.servers)]
        self._rtx = [self._add(f"npu{i}.roce.tx", "roce", roce, roce_half) for i in range(n)]
        self._rrx = [self._add(f"npu{i}.roce.rx", "roce", roce, roce_half) for i in range(n)]
        self._cache: dict[tuple[int, int, str], tuple[Link, ...]] = {}

    def _add(self, name: str, plane: str, bw: float, lat: float) -> Link:
        link = Link(len(self.links), name, plane, bw, lat)
        self.links.append(link)
        self.by_name[name] = link
        return link

    @property
    def npus(self) -> int:
        return self.cfg.npus

    def server_of(self, npu: int) -> int:
        return npu // self.cfg.npus_per_server

    def check_npu(self, npu: int, what: str = "npu") -> None:
        if isinstance(npu, bool) or not isinstance(npu, int) or not 0 <= npu < self.npus:
            raise TopologyError(f"{what} {npu!r} out of range 0..{self.npus - 1}")

    def link(self, name: str) -> Link:
        try:
            return self.by_name[name]
        except KeyError:
            raise TopologyError(f"unknown link {name!r} (e.g. npu0.tx, srv0.l1, srv0.up, npu0.roce.rx)") from None

    def path(self, src: int, dst: int, plane: str = "ub") -> tuple[Link, ...]:
        key = (src, dst, plane)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        self.check_npu(src, "source npu")
        self.check_npu(dst, "destination npu")
        if plane not in PLANES:
            raise TopologyError(f"unknown plane {plane!r} (known: {', '.join(PLANES)})")
        if src == dst:
            p: tuple[Link, ...] = ()
        elif plane == "roce":
            p = (self._rtx[src], self._rrx[dst])
        else:
            a, b = self.server_of(src), self.server_of(dst)
            if a == b:
                p = (self._tx[src], self._l1[a], self._rx[dst])
            else:
                p = (self._tx[src], self._l1[a], self._up[a], self._down[b], self._l1[b], self._rx[dst])
        if len(self._cache) < 1 << 16:
            self._cache[key] = p
        return p
