"""The link model: when does a transfer complete? Pure (no I/O, no clock: ``now`` is passed in).

Model (defended in README.md):
- Every link is a work-conserving FIFO server with capacity ``bandwidth x factor``. Its
  ``free_at`` is the time by which all bytes committed to it so far are through.
- Requests are answered at reservation time and an answer is never revised, so the model
  is causal: a later request cannot change an earlier answer. Requests of one *batch* (the
  sim reads every request waiting on its socket, then answers them with one clock reading)
  are simultaneous: each starts once every link on its path is free, then they share links
  max-min fairly (``fluid.py``). So two transfers over one link, reserved together, both
  finish later than one alone and the last finishes at the sum; reserved one after the
  other, the second queues behind the first (FIFO): same aggregate finish either way.
- completion = start + fluid transfer time + latency(path), where latency is the sum of
  link latencies plus injected latency; latency pipelines and does not occupy a link.
- All durations are model time x ``time_scale`` (wall seconds); ``now`` is wall seconds.
- After a batch, each link's ``free_at`` advances by (its batch bytes / capacity) from the
  earliest start of a batch flow on it: a fat link carrying one thin flow is not reserved
  for the whole flow, it keeps its spare capacity for others (an approximation: exact for
  the bottleneck link, optimistic by at most one flow's serialisation on faster links).
Faults apply to reservations made after them; granted transfers are never revoked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fabric_sim.config import FabricConfig
from fabric_sim.fluid import fluid_finish_times
from fabric_sim.table import LinkTable
from fabric_sim.topology import GB, PLANES, Link, Topology, TopologyError


class FaultError(ValueError):
    """A fault request names an unknown link or carries an impossible value."""


@dataclass(frozen=True, slots=True)
class TransferRequest:
    src: int
    dst: int
    nbytes: int
    plane: str = "ub"


@dataclass(frozen=True, slots=True)
class Grant:
    delay_s: float  # wall seconds from ``now`` until the data may be seen at dst
    finish_at: float  # now + delay_s
    queue_s: float  # part of delay spent waiting for busy links
    latency_s: float  # part of delay that is path latency (scaled)


@dataclass(frozen=True, slots=True)
class Refusal:
    link: str  # the down link, or "partition#N"
    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str  # malformed request (bad NPU, plane or size): the requester's bug


Outcome = Grant | Refusal | Rejected


@dataclass(frozen=True, slots=True)
class LinkTelemetry:
    name: str
    plane: str
    bandwidth_gbps: float
    latency_us: float
    up: bool
    added_latency_us: float
    bandwidth_factor: float
    bytes: int
    transfers: int
    refusals: int
    busy_s: float
    utilization: float


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    id: str
    npus_a: tuple[int, ...]
    npus_b: tuple[int, ...]


class FabricModel:
    """The model over a ``LinkTable``: private by default, or the pod's shared table (the
    simulator's, or a client's mapping of it: ``fabric_sim/table.py``). Faults and partitions
    are set by the simulator only; reservations may come from any process mapping the table,
    each holding the table's lock around ``reserve``/``reserve_batch``."""

    def __init__(self, cfg: FabricConfig, now: float, table: LinkTable | None = None) -> None:
        self.cfg = cfg
        self.topo = Topology(cfg)
        self.scale = cfg.time_scale
        self.started_at = now
        n = len(self.topo.links)
        if table is None:
            table = LinkTable.private(n, self.topo.npus)
            table.free_at[:] = now
        elif (table.n_links, table.npus) != (n, self.topo.npus):
            raise FaultError(f"link table has {table.n_links} links for {table.npus} NPUs; "
                             f"this topology has {n} for {self.topo.npus}")
        self.table = table
        t = table
        self._free_at, self._bytes, self._transfers, self._refusals = t.free_at, t.bytes, t.transfers, t.refusals
        self._busy, self._up, self._added_lat, self._factor = t.busy, t.up, t.added_lat, t.factor
        self._faulted: set[int] = set()

    @property
    def _partitions(self) -> list[tuple[str, frozenset[int], frozenset[int]]]:
        return self.table.partitions()

    # ---- reservations -------------------------------------------------------------------
    def reserve(self, req: TransferRequest, now: float) -> Outcome:
        """One transfer alone: what ``reserve_batch([req], now)[0]`` answers (the same
        arithmetic), without the batch's bookkeeping: the per-transfer path of every client
        of the shared table."""
        checked = self._check(req)
        if not isinstance(checked, tuple):
            return checked
        path = checked
        if not path or req.nbytes == 0:
            lat = self._latency(path)
            for link in path:
                self._transfers[link.index] += 1
            return Grant(lat, now + lat, 0.0, lat)
        free_at, nbytes = self._free_at, req.nbytes
        locked = self.table.lock()
        try:
            start = now
            cap = math.inf
            for link in path:
                start = max(start, float(free_at[link.index]))
                cap = min(cap, self._cap(link))
            for link in path:
                li = link.index
                busy = nbytes / self._cap(link)
                self._transfers[li] += 1
                self._bytes[li] += nbytes
                self._busy[li] += busy
                free_at[li] = max(float(free_at[li]), start) + busy
        finally:
            if locked:
                self.table.unlock()
        lat = self._latency(path)
        done = start + nbytes / cap + lat
        return Grant(done - now, done, start - now, lat)

    def reserve_batch(self, reqs: Sequence[TransferRequest], now: float) -> list[Outcome]:
        """Answers in request order, under the table's lock (other processes may share it)."""
        locked = self.table.lock()
        try:
            return self._reserve_batch(reqs, now)
        finally:
            if locked:
                self.table.unlock()

    def _reserve_batch(self, reqs: Sequence[TransferRequest], now: float) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(reqs)
        flows: list[int] = []  # request indices that need link time
        paths: list[tuple[Link, ...]] = []
        for i, r in enumerate(reqs):
            checked = self._check(r)
            if not isinstance(checked, tuple):
                out[i] = checked
                continue
            path = checked
            if not path or r.nbytes == 0:
                lat = self._latency(path)
                out[i] = Grant(lat, now + lat, 0.0, lat)
                for link in path:
                    self._transfers[link.index] += 1
                continue
            flows.append(i)
            paths.append(path)
        if flows:
            self._run_flows(reqs, flows, paths, now, out)
        return out  # type: ignore[return-value]

    def _check(self, r: TransferRequest) -> Outcome | tuple[Link, ...]:
        if isinstance(r.nbytes, bool) or not isinstance(r.nbytes, int) or r.nbytes < 0:
            return Rejected(f"nbytes must be an integer >= 0, got {r.nbytes!r}")
        try:
            path = self.topo.path(r.src, r.dst, r.plane)
        except TopologyError as exc:
            return Rejected(str(exc))
        for link in path:
            if self._up[link.index] == 0.0:
                self._refusals[link.index] += 1
                return Refusal(link.name, f"link {link.name} is down")
        for pid, a, b in self._partitions:
            if (r.src in a and r.dst in b) or (r.src in b and r.dst in a):
                return Refusal(pid, f"npu{r.src} and npu{r.dst} are on opposite sides of {pid}")
        return path

    def _latency(self, path: Iterable[Link]) -> float:
        return sum(link.latency_s + float(self._added_lat[link.index]) for link in path) * self.scale

    def _cap(self, link: Link) -> float:
        """Bytes per wall second."""
        return link.bandwidth_Bps * float(self._factor[link.index]) / self.scale

    def _run_flows(self, reqs: Sequence[TransferRequest], flows: list[int],
                   paths: list[tuple[Link, ...]], now: float, out: list[Outcome | None]) -> None:
        starts = [max(now, max(float(self._free_at[link.index]) for link in p)) for p in paths]
        idx_paths = [[link.index for link in p] for p in paths]
        cap = {link.index: self._cap(link) for p in paths for link in p}
        sizes = [float(reqs[i].nbytes) for i in flows]
        finishes = fluid_finish_times(starts, sizes, idx_paths, cap)
        batch_bytes: dict[int, int] = {}
        first_start: dict[int, float] = {}
        for k, i in enumerate(flows):
            nbytes = reqs[i].nbytes
            for li in idx_paths[k]:
                batch_bytes[li] = batch_bytes.get(li, 0) + nbytes
                first_start[li] = min(first_start.get(li, math.inf), starts[k])
                self._transfers[li] += 1
            lat = self._latency(paths[k])
            done = finishes[k] + lat
            out[i] = Grant(done - now, done, starts[k] - now, lat)
        for li, nbytes in batch_bytes.items():
            busy = nbytes / cap[li]
            self._bytes[li] += nbytes
            self._busy[li] += busy
            self._free_at[li] = max(float(self._free_at[li]), first_start[li]) + busy

    # ---- faults -------------------------------------------------------------------------
    def _link(self, name: str) -> Link:
        try:
            return self.topo.link(name)
        except TopologyError as exc:
            raise FaultError(str(exc)) from None

    def _touch(self, li: int) -> None:
        if self._up[li] == 1.0 and self._added_lat[li] == 0.0 and self._factor[li] == 1.0:
            self._faulted.discard(li)
        else:
            self._faulted.add(li)

    def set_link_state(self, name: str, up: bool) -> None:
        link = self._link(name)
        self._up[link.index] = 1.0 if up else 0.0
        self._touch(link.index)

    def set_link_latency(self, name: str, added_latency_us: float) -> None:
        link = self._link(name)
        if not (math.isfinite(added_latency_us) and added_latency_us >= 0):
            raise FaultError(f"added_latency_us must be a finite number >= 0, got {added_latency_us!r}")
        self._added_lat[link.index] = added_latency_us * 1e-6
        self._touch(link.index)

    def set_link_bandwidth(self, name: str, factor: float) -> None:
        link = self._link(name)
        if not (math.isfinite(factor) and 0 < factor <= 1):
            raise FaultError(f"bandwidth factor must be in (0, 1] (1 = full bandwidth), got {factor!r}")
        self._factor[link.index] = float(factor)
        self._touch(link.index)

    def partition(self, npus_a: Iterable[int], npus_b: Iterable[int]) -> str:
        a, b = frozenset(npus_a), frozenset(npus_b)
        if not a or not b:
            raise FaultError("partition needs two non-empty sets of NPUs")
        for npu in sorted(a | b):
            try:
                self.topo.check_npu(npu)
            except TopologyError as exc:
                raise FaultError(f"partition: {exc}") from None
        if a & b:
            raise FaultError(f"partition sets overlap: {sorted(a & b)}")
        pid = f"partition#{self.table.next_partition_number()}"
        self._write_partitions([*self._partitions, (pid, a, b)])
        return pid

    def _write_partitions(self, parts: list[tuple[str, frozenset[int], frozenset[int]]]) -> None:
        self.table.write_partitions([(int(p.split("#")[1]), a, b) for p, a, b in parts])

    def heal_partition(self, pid: str) -> None:
        if pid not in [p for p, _, _ in self._partitions]:
            raise FaultError(f"no partition {pid!r} (active: {[p for p, _, _ in self._partitions]})")
        self._write_partitions([p for p in self._partitions if p[0] != pid])

    def clear_faults(self) -> None:
        for li in self._faulted:
            self._up[li], self._added_lat[li], self._factor[li] = 1.0, 0.0, 1.0
        self._faulted.clear()
        self.table.write_partitions([])

    @property
    def active_faults(self) -> int:
        return len(self._faulted) + len(self._partitions)

    def partitions(self) -> list[PartitionInfo]:
        return [PartitionInfo(pid, tuple(sorted(a)), tuple(sorted(b))) for pid, a, b in self._partitions]

    # ---- telemetry ----------------------------------------------------------------------
    def uptime(self, now: float) -> float:
        return max(0.0, now - self.started_at)

    def link_telemetry(self, now: float, *, all_links: bool = False) -> list[LinkTelemetry]:
        """Per-link counters; unless ``all_links``, only links with traffic or a fault."""
        up_s = self.uptime(now)
        rows = []
        for link in self.topo.links:
            li = link.index
            if not (all_links or self._transfers[li] or self._refusals[li] or li in self._faulted):
                continue
            rows.append(LinkTelemetry(
                name=link.name, plane=link.plane, bandwidth_gbps=link.bandwidth_Bps / GB,
                latency_us=link.latency_s * 1e6, up=bool(self._up[li]),
                added_latency_us=float(self._added_lat[li]) * 1e6, bandwidth_factor=float(self._factor[li]),
                bytes=int(self._bytes[li]), transfers=int(self._transfers[li]), refusals=int(self._refusals[li]),
                busy_s=float(self._busy[li]),
                utilization=min(1.0, float(self._busy[li]) / up_s) if up_s > 0 else 0.0))
        return rows

    def base_latency_s(self, plane: str = "ub") -> float:
        """Smallest fixed latency of any transfer between two NPUs on ``plane`` (wall s)."""
        if plane not in PLANES:
            raise TopologyError(f"unknown plane {plane!r}")
        if self.topo.npus < 2:
            return 0.0
        return sum(link.latency_s for link in self.topo.path(0, 1, plane)) * self.scale
