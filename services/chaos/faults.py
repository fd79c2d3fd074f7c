"""Fault injection against a running pod, each fault proving it took effect.

Process faults work on any process this user may signal (``xds up`` runs the pod in another
process, so nothing here relies on being the parent): the proof is read from
``/proc/PID/stat`` -- the PID gone (or a zombie awaiting its reaper) after kill -9 or SIGTERM,
state ``T`` after SIGSTOP, not ``T`` after SIGCONT. Before signalling, ``/proc/PID/cmdline``
must name the service (``services.run ... --name NAME``): a stale PID never hits a stranger.

Fabric faults go through the simulator's admin API (``xds.v1.Fabric``) and are read back with
``GetTelemetry``: each link's state / added latency / bandwidth factor, each partition's NPU
sets. Healing a partition lifts that one (``HealPartition`` with the id the simulator gave it);
every other active fault is read back after any heal.

Polling /proc is the only way to observe a non-child's state; it runs with a deadline, every
few milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc

from services.api.xds.v1 import fabric_pb2 as pb
from services.api.xds.v1 import fabric_pb2_grpc as pb_grpc

POLL_S = 0.002
# The straggler admin call the experts will offer (module:function); see ``straggler_call``.


class FaultNotInjected(RuntimeError):
    """The fault did not take effect (or could not be proven to): the experiment fails."""


class FaultNotSupported(RuntimeError):
    """The pod offers no way to inject this fault kind."""


def proc_state(pid: int) -> str:
    """The one-letter state from /proc/PID/stat ("" once the PID is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def gone(pid: int) -> bool:
    return proc_state(pid) in ("", "Z", "X")


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


async def check_identity(pid: int, service: str) -> None:
    try:
        raw = _cmdline(pid)
        # Empty while an exec is still setting up the new image (or for a zombie): look again
        # for a moment before judging.
        if not raw and not gone(pid):
            await _until(lambda: bool(_cmdline(pid)) or gone(pid), 0.5)
            raw = _cmdline(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise FaultNotInjected(f"{service}: pid {pid} does not exist (the service is not running)") from None
    argv = raw.split(b"\0")
    if b"--name" not in argv or argv[argv.index(b"--name") + 1:argv.index(b"--name") + 2] != [service.encode()]:
        raise FaultNotInjected(f"{service}: pid {pid} is not that service ({b' '.join(argv).decode(errors='replace')!r})")


def _signal(service: str, pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise FaultNotInjected(f"{service}: pid {pid} vanished before {sig.name}") from None


async def _until(cond, timeout_s: float) -> float | None:
    """Seconds until ``cond()`` held, or None at the deadline."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            return None
        await asyncio.sleep(POLL_S)


async def _end(service: str, pid: int, sig: signal.Signals, timeout_s: float) -> float:
    """Signal ``sig`` to the verified ``service`` process; seconds until it is gone from /proc."""
    await check_identity(pid, service)
    _signal(service, pid, sig)
    took = await _until(lambda: gone(pid), timeout_s)
    if took is None:
        raise FaultNotInjected(f"{service}: pid {pid} still exists {timeout_s:g}s after {sig.name} "
                               f"(state {proc_state(pid)!r})")
    return took


async def kill(service: str, pid: int, timeout_s: float = 10.0) -> str:
    took = await _end(service, pid, signal.SIGKILL, timeout_s)
    return f"SIGKILL pid {pid}: gone from /proc after {took * 1000:.1f} ms"


async def terminate(service: str, pid: int, timeout_s: float = 15.0) -> str:
    took = await _end(service, pid, signal.SIGTERM, timeout_s)
    return f"SIGTERM pid {pid}: exited after {took:.2f} s"


async def stop(service: str, pid: int, timeout_s: float = 5.0) -> str:
    await check_identity(pid, service)
    _signal(service, pid, signal.SIGSTOP)
    took = await _until(lambda: proc_state(pid) in ("T", "t"), timeout_s)
    if took is None:
        raise FaultNotInjected(f"{service}: pid {pid} not stopped {timeout_s:g}s after SIGSTOP (state {proc_state(pid)!r})")
    return f"SIGSTOP pid {pid}: /proc state T after {took * 1000:.1f} ms"


async def cont(service: str, pid: int, timeout_s: float = 5.0) -> str:
    state = proc_state(pid)
    if state not in ("T", "t"):
        raise FaultNotInjected(f"{service}: pid {pid} did not stay stopped (state {state!r} before SIGCONT)")
    _signal(service, pid, signal.SIGCONT)
    took = await _until(lambda: proc_state(pid) not in ("T", "t"), timeout_s)
    if took is None:
        raise FaultNotInjected(f"{service}: pid {pid} still stopped {timeout_s:g}s after SIGCONT")
    return f"held in state T until SIGCONT; running again (state {proc_state(pid)!r}) after {took * 1000:.1f} ms"


def straggler_call():
    """The straggler admin call (``services.common.admin``), as the runner uses it:
    ``async call(pod, service, delay_ms, per) -> str`` sets (``delay_ms`` 0: clears) the
    slowdown of ``service`` and returns the proof: the state read back from the service, and
    on clearing, how many units it delayed meanwhile (none: the fault did nothing, which
    fails the experiment)."""
    return _straggle


_straggle_from: dict[str, int] = {}


async def _straggle(pod: Any, service: str, delay_ms: float, per: str) -> str:
    """``pod``: the runner's pod handle (its spec, and where this tool reaches a service's RPC)."""
    from services.common.admin import get_straggler, set_straggler

    at = pod.address(service, "rpc")
    if delay_ms > 0:
        st = await set_straggler(pod.spec, service, delay_ms, address=at)
        if st.unit != per:
            await set_straggler(pod.spec, service, 0.0, address=at)
            raise FaultNotSupported(f"straggler: {service} is slowed per {st.unit}, not per {per} "
                                    f"(experts: per block; attention ranks: per step)")
        back = await get_straggler(pod.spec, service, address=at)
        if back.delay_ms != delay_ms:
            raise FaultNotInjected(f"{service}: straggler read back {back.delay_ms} ms per {back.unit}, "
                                   f"set {delay_ms}")
        _straggle_from[service] = back.delayed
        return f"read back: {back.delay_ms:g} ms per {back.unit} in force"
    before = _straggle_from.pop(service, None)
    st = await set_straggler(pod.spec, service, 0.0, address=at)
    if before is not None and st.delayed <= before:
        raise FaultNotInjected(f"{service}: the straggler delayed no {st.unit} while in force (it did nothing)")
    return f"read back: cleared after delaying {st.delayed - (before or 0)} {st.unit}s"


@dataclass(frozen=True, slots=True)
class LinkFault:
    """What one fabric fault sets: links (state/latency/factor) or one partition."""
    links: tuple[str, ...] = ()
    up: bool = True
    added_latency_us: float = 0.0
    bandwidth_factor: float = 1.0
    npus_a: tuple[int, ...] = ()
    npus_b: tuple[int, ...] = ()

    @property
    def is_partition(self) -> bool:
        return bool(self.npus_a)


class Fabric:
    """The simulator's admin API, with read-back. One instance per experiment, one loop."""

    def __init__(self, admin_address: str) -> None:
        self.address = admin_address
        self._channel = grpc.aio.insecure_channel(admin_address)
        self.stub = pb_grpc.FabricStub(self._channel)
        self.active: dict[int, LinkFault] = {}      # fault index -> what it set
        self.partition_ids: dict[int, str] = {}     # fault index -> the simulator's partition id

    async def close(self) -> None:
        await self._channel.close()

    async def telemetry(self) -> pb.Telemetry:
        try:
            return await self.stub.GetTelemetry(pb.GetTelemetryRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise FaultNotInjected(f"cannot read the fabric's state back: {exc.code().name}: {exc.details()}") from None

    async def _apply(self, f: LinkFault) -> str:
        """Sets ``f``; a partition's id (what ``HealPartition`` takes), else ""."""
        if f.is_partition:
            ack = await self.stub.Partition(pb.PartitionRequest(npus_a=list(f.npus_a), npus_b=list(f.npus_b)),
                                            timeout=5)
            return ack.partition_id
        for link in f.links:
            if not f.up:
                await self.stub.SetLinkState(pb.SetLinkStateRequest(link=link, up=False), timeout=5)
            if f.added_latency_us:
                await self.stub.SetLinkLatency(pb.SetLinkLatencyRequest(link=link, added_latency_us=f.added_latency_us),
                                               timeout=5)
            if f.bandwidth_factor != 1.0:
                await self.stub.SetLinkBandwidth(pb.SetLinkBandwidthRequest(link=link, factor=f.bandwidth_factor),
                                                 timeout=5)
        return ""

    async def inject(self, index: int, f: LinkFault) -> str:
        try:
            pid = await self._apply(f)
        except grpc.aio.AioRpcError as exc:
            raise FaultNotInjected(f"fabric admin refused: {exc.code().name}: {exc.details()}") from None
        self.active[index] = f
        if pid:
            self.partition_ids[index] = pid
        return await self.verify(f, present=True)

    async def revert(self, index: int) -> str:
        f = self.active.pop(index)
        try:
            if f.is_partition:   # that partition only
                await self.stub.HealPartition(pb.HealPartitionRequest(partition_id=self.partition_ids.pop(index)),
                                              timeout=5)
            else:
                for link in f.links:
                    await self.stub.SetLinkState(pb.SetLinkStateRequest(link=link, up=True), timeout=5)
                    await self.stub.SetLinkLatency(pb.SetLinkLatencyRequest(link=link, added_latency_us=0), timeout=5)
                    await self.stub.SetLinkBandwidth(pb.SetLinkBandwidthRequest(link=link, factor=1.0), timeout=5)
                # Another active fault may share a link: put its settings back.
                for other in self.active.values():
                    if not other.is_partition and set(other.links) & set(f.links):
                        await self._apply(other)
        except grpc.aio.AioRpcError as exc:
            raise FaultNotInjected(f"fabric admin refused the heal: {exc.code().name}: {exc.details()}") from None
        evidence = await self.verify(f, present=False)
        for other in self.active.values():
            await self.verify(other, present=True)
        return evidence

    async def verify(self, f: LinkFault, *, present: bool) -> str:
        t = await self.telemetry()
        if f.is_partition:
            want = (tuple(sorted(f.npus_a)), tuple(sorted(f.npus_b)))
            found = [p.id for p in t.partitions if (tuple(p.npus_a), tuple(p.npus_b)) == want]
            if bool(found) != present:
                raise FaultNotInjected(f"partition {list(want[0])} | {list(want[1])} "
                                       f"{'missing from' if present else 'still in'} the simulator's telemetry")
            return (f"simulator reports {found[0]} between NPUs {list(want[0])} and {list(want[1])}" if present
                    else f"simulator reports no partition between NPUs {list(want[0])} and {list(want[1])}")
        rows = {r.name: r for r in t.links}
        seen = []
        for link in f.links:
            r = rows.get(link)
            if present:
                ok = r is not None and (f.up or not r.up) and (not f.added_latency_us or
                                                               abs(r.added_latency_us - f.added_latency_us) < 1e-6) \
                    and (f.bandwidth_factor == 1.0 or abs(r.bandwidth_factor - f.bandwidth_factor) < 1e-9)
            else:
                ok = r is None or (r.up and r.added_latency_us == 0 and r.bandwidth_factor == 1.0)
            if not ok:
                raise FaultNotInjected(f"link {link}: simulator reads back "
                                       f"{'nothing' if r is None else f'up={r.up} +{r.added_latency_us}us x{r.bandwidth_factor}'}"
                                       f" {'after' if present else 'after healing'} the fault")
            if r is not None:
                seen.append(f"{link} up={r.up} +{r.added_latency_us:g}us x{r.bandwidth_factor:g}")
            else:
                seen.append(f"{link} nominal")
        return "simulator reads back " + "; ".join(seen)
