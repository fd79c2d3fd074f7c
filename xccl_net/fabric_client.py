"""Client of the fabric simulator: when does a transfer complete?

With the pod's *shared link table* (``table_path``, ``fabric_sim/table.py``) the client
answers that itself: the simulator's model code over the shared link state, under the
table's lock, no message and no wake-up of anyone. The simulator still owns the state
(faults, partitions, telemetry); its death or a hang costs nothing on this path, timing stays
modelled. Without the table (or once the simulator closed it on a clean exit) the client asks
the simulator, one round trip per transfer, as follows.

``FabricClient.connect(None, ...)`` gives the *ideal* fabric (zero delay, no I/O, no faults).
Otherwise one DEALER socket per client; ``reserve`` calls are pipelined (any number in
flight, matched by ``req_id``) and driven by ``ZmqPump`` (``loop.add_reader`` on the zmq
FD) instead of ``zmq.asyncio``, which costs twice as much per round trip on this host.

The simulator is emulated timing, not a data path (``fabric_state.py`` is the lifecycle):
- a reservation not answered within ``deadline_s`` (default 0.25 s, far below any step or
  request timeout) means the simulator is dead or hung: that transfer and every other one in
  flight go on *unmodelled* (delay 0), the client logs ``fabric.unavailable`` once and from
  then on does not ask the simulator at all (no per-transfer timeout), only probes it with a
  ``Register`` every ``probe_interval_s``; unmodelled transfers are counted
  (``stats["unmodelled_transfers"]``, ``load()`` for heartbeats);
- the first registration acknowledged (a restarted process on the same address, or the old
  one continued after SIGSTOP) logs ``fabric.back`` and timing resumes;
- answers are never misattributed: request ids are never reused, a request's entry leaves
  ``_pending`` when its caller stops waiting, and a late reply (a continued simulator
  answering what it read before it stopped) finds no entry and is counted as stray;
- the socket uses ``IMMEDIATE``: while the simulator is down, requests wait in the bounded
  send queue and are dropped unsent once unwanted, so a restarted simulator never receives
  stale reservations (a continued one may: it read them before it stopped);
- link faults are answers, not outages: ``Refused`` raises ``LinkDown`` as always;
- every reply carries the simulator's epoch; a new epoch means it restarted, and the client
  registers again (fire-and-forget: the reservation that revealed it is already valid).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from fabric_sim.config import FabricConfig
from fabric_sim.model import FabricModel, Grant, Refusal, TransferRequest
from fabric_sim.protocol import (BAD_REQUEST, REPLIES, Failed, FidelityReport, Granted, Refused, Register,
                                 Registered, Reserve)
from fabric_sim.table import LinkTable, TableError
from fabric_sim.topology import PLANES
from services.common.zmqio import SendQueueFull, ZmqPump
from services.common.logging import get_logger
from services.common.wire import WireError, decode, encode
from xccl_net.errors import EndpointClosed, FabricUnavailable, LinkDown, PeerUnreachable, XcclError
from xccl_net.fabric_state import CameBack, Effect, EpochChanged, FabricLink, SendProbe, WentUnmodelled

log = get_logger()

IDEAL = None  # pass as the address for the ideal fabric
SPIN_MARGIN_S = 0.0015  # event-loop timers are ~1 ms coarse and uvloop's fire early
_REREGISTER_TIMEOUT_S = 2.0
DEADLINE_S = 0.25        # a reservation unanswered this long: the simulator is dead or hung
PROBE_INTERVAL_S = 0.2   # while it is: one Register this often


class FabricRequestError(XcclError):
    """The simulator rejected a request as impossible (e.g. this client's NPU is out of range)."""


def _rejected(reason: str) -> XcclError:
    """An impossible request, whether the shared table or the simulator judged it: a peer NPU
    the fabric does not have is an unreachable peer; anything else this client's own bug."""
    kind = PeerUnreachable if "npu" in reason else FabricRequestError
    return kind(f"fabric simulator rejected the request: {reason}")


@dataclass(slots=True)
class _Pending:
    fut: asyncio.Future
    timer: asyncio.TimerHandle
    sent_at: float
    degrade: bool    # a reservation: on a miss it goes unmodelled instead of failing


class FabricClient:
    def __init__(self, address: str | None, *, name: str, npu: int, deadline_s: float = DEADLINE_S,
                 probe_interval_s: float = PROBE_INTERVAL_S, table_path: str = "") -> None:
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.address = address
        self.name = name
        self._npu = npu
        self._npus: int | None = None
        self.epoch: str | None = None
        self.time_scale: float | None = None
        self.deadline_s = deadline_s
        self.link = FabricLink(name, probe_interval_s=probe_interval_s)
        self.table_path = table_path
        self._local: FabricModel | None = None   # the shared link table, when mapped
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._sock: zmq.Socket | None = None
        self._pump: ZmqPump | None = None
        self._monitor: ZmqPump | None = None
        self._closed = False
        self._reregister_sent_at = -1e9
        self._probe_rid = 0
        self._probe_timer: asyncio.TimerHandle | None = None
        # Called (no arguments) whenever the state or the unmodelled count changes: tests and
        # tools wait on these events instead of polling.
        self.watchers: list[Callable[[], None]] = []
        self._stats: dict[str, Any] = dict(
            reserves=0, grants=0, refusals=0, failures=0, unavailable=0, last_rtt_s=0.0, rtt_sum_s=0.0,
            rtt_max_s=0.0, registrations=0, epoch_changes=0, stray_replies=0, bad_replies=0, disconnects=0,
            last_outage_reason="", local_reserves=0, table_attaches=0, table_detaches=0,
            waits=0, wait_late_sum_s=0.0, wait_late_max_s=0.0, wait_target_sum_s=0.0)

    # ---- lifecycle ----------------------------------------------------------------------
    @classmethod
    async def connect(cls, address: str | None, *, name: str, npu: int, timeout_s: float = 2.0,
                      deadline_s: float = DEADLINE_S, probe_interval_s: float = PROBE_INTERVAL_S,
                      allow_unreachable: bool = False, table_path: str = "") -> FabricClient:
        """Connect and register. If the simulator does not answer within ``timeout_s``: raise
        ``FabricUnavailable``, or with ``allow_unreachable`` start unmodelled and keep probing
        (a service restarted while the simulator is down still comes up). With ``table_path``
        the client maps the simulator's shared link table and reserves locally (see above)."""
        if isinstance(npu, bool) or not isinstance(npu, int) or npu < 0:
            raise ValueError(f"npu must be an integer >= 0, got {npu!r}")
        client = cls(address, name=name, npu=npu, deadline_s=deadline_s, probe_interval_s=probe_interval_s,
                     table_path=table_path)
        if address is None:
            return client
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise FabricUnavailable(f"cannot connect to fabric simulator at {address!r}: {exc}") from exc
        client._sock = sock
        client._pump = ZmqPump(sock, client._on_batch)
        client._pump.start()
        # The connection's own events: a killed simulator closes it (its reservations in flight
        # are released at once instead of at their deadline); a new handshake means one is
        # listening again (probe now instead of at the next interval).
        client._monitor = ZmqPump(sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED),
                                  client._on_monitor)
        client._monitor.start()
        try:
            rid = next(client._ids)
            await client._request(rid, Register(rid, name, npu), timeout_s, degrade=False)
        except FabricUnavailable as exc:
            if not allow_unreachable:
                await client.close()
                raise
            client._apply(client.link.missed(time.monotonic(), f"no answer to registration: {exc}"))
        except BaseException:
            await client.close()
            raise
        client._attach()
        return client

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._detach()
        self.link.close()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        for rid in list(self._pending):
            self._settle(rid, exc=EndpointClosed(f"fabric client {self.name} closed"))
        if self._pump is not None:
            self._pump.stop()
        if self._monitor is not None:
            self._monitor.stop()
            self._sock.disable_monitor()
            self._monitor.sock.close(linger=0)
        if self._sock is not None:
            self._sock.close(linger=0)

    async def __aenter__(self) -> FabricClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- properties ---------------------------------------------------------------------
    @property
    def npu(self) -> int:
        return self._npu

    @property
    def is_ideal(self) -> bool:
        return self.address is None

    @property
    def modelled(self) -> bool:
        """Timing is modelled now: the shared table is mapped, or the simulator answers."""
        return self.is_ideal or self._local is not None or self.link.modelled

    @property
    def local(self) -> bool:
        """Reservations are computed here, over the shared link table."""
        return self._local is not None

    @property
    def stats(self) -> dict[str, Any]:
        s = dict(self._stats)
        s["rtt_mean_s"] = s["rtt_sum_s"] / s["grants"] if s["grants"] else 0.0
        s["wait_late_mean_s"] = s["wait_late_sum_s"] / s["waits"] if s["waits"] else 0.0
        s["in_flight"] = len(self._pending)
        s["epoch"] = self.epoch
        s["state"] = self.link.state
        s["unmodelled_transfers"] = self.link.unmodelled_transfers
        s["outages"] = self.link.outages
        s["probes"] = self.link.probes
        return s

    def load(self) -> dict[str, float]:
        """For a service's heartbeat load: ``fabric_unmodelled_transfers``, ``fabric_modelled``, ..."""
        out = self.link.load()
        if self._local is not None:
            out["fabric_modelled"] = 1.0
        out["fabric_local"] = 1.0 if self._local is not None else 0.0
        out["fabric_local_reserves"] = float(self._stats["local_reserves"])
        return out

    # ---- the shared link table --------------------------------------------------------------
    def _attach(self) -> None:
        """Map the simulator's link table if there is one (idempotent; quiet when there is not)."""
        if not self.table_path or self._local is not None or self._closed:
            return
        try:
            table = LinkTable.attach(self.table_path)
        except (OSError, TableError):
            return
        try:
            if not table.is_open:
                raise TableError("closed")
            model = FabricModel(FabricConfig(**table.config_json()), time.monotonic(), table=table)
            model.topo.check_npu(self._npu)
        except (TableError, TypeError, ValueError) as exc:
            table.close()
            log.warning("fabric_client.table_unusable", name=self.name, path=self.table_path, error=str(exc))
            return
        self._local = model
        self.time_scale = model.scale
        self._npus = model.topo.npus
        self._stats["table_attaches"] += 1
        log.info("fabric_client.table", name=self.name, npu=self._npu, path=self.table_path,
                 generation=table.generation)
        self._notify()

    def _detach(self) -> None:
        if self._local is None:
            return
        self._local.table.close()
        self._local = None
        self._stats["table_detaches"] += 1

    def _reserve_local(self, model: FabricModel, src_npu: int, dst_npu: int, nbytes: int, plane: str) -> float:
        out = model.reserve(TransferRequest(src_npu, dst_npu, nbytes, plane), time.monotonic())
        s = self._stats
        s["local_reserves"] += 1
        if isinstance(out, Grant):
            s["grants"] += 1
            return out.delay_s
        if isinstance(out, Refusal):
            s["refusals"] += 1
            raise LinkDown(f"fabric refused transfer from npu{src_npu}: {out.reason}", link=out.link)
        s["failures"] += 1
        raise _rejected(out.reason)

    # ---- API ----------------------------------------------------------------------------
    async def reserve(self, dst_npu: int, nbytes: int, *, plane: str = "ub", timeout_s: float | None = None,
                      src_npu: int | None = None) -> float:
        """Wall seconds after this reply until the transfer is complete at ``dst_npu``.

        0.0 when the simulator is unreachable (the transfer is unmodelled, and counted); a
        link fault it reports raises ``LinkDown``. ``timeout_s`` overrides ``deadline_s``.
        ``src_npu`` (default: this client's NPU) asks about another sender's path: a path
        probe of the way back (0 bytes)."""
        delay = self.reserve_now(dst_npu, nbytes, plane=plane, src_npu=src_npu)
        if delay is not None:
            return delay
        if not self.link.admit():
            self._notify()
            return 0.0
        rid = next(self._ids)
        src = self._npu if src_npu is None else src_npu
        delay = await self._request(rid, Reserve(rid, src, dst_npu, nbytes, plane),
                                    self.deadline_s if timeout_s is None else timeout_s, degrade=True)
        return 0.0 if delay is None else delay

    def reserve_now(self, dst_npu: int, nbytes: int, *, plane: str = "ub", src_npu: int | None = None) -> float | None:
        """``reserve`` without I/O, when it needs none (no simulator configured, or the shared
        link table mapped): the same delay or the same errors. None: only the simulator can
        answer now (its table is not mapped), so ``await reserve``."""
        src = self._npu if src_npu is None else src_npu
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an integer >= 0, got {nbytes!r}")
        if plane not in PLANES:
            raise ValueError(f"unknown plane {plane!r} (known: {', '.join(PLANES)})")
        for what, v in (("dst_npu", dst_npu), ("src_npu", src)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what} must be an integer >= 0, got {v!r}")
        if self._closed:
            raise EndpointClosed(f"fabric client {self.name} is closed")
        self._stats["reserves"] += 1
        if self.address is None:
            self._stats["grants"] += 1
            return 0.0
        local = self._local
        if local is not None:
            if local.table.is_open:
                return self._reserve_local(local, src, dst_npu, nbytes, plane)
            log.info("fabric_client.table_closed", name=self.name, npu=self._npu,
                     note="the simulator stopped: asking it over the network until it is back")
            self._detach()
        return None

    async def wait_until(self, deliver_at: float) -> None:
        """Return at ``deliver_at`` (time.monotonic) or later, never earlier."""
        remaining = deliver_at - time.monotonic()
        if remaining > SPIN_MARGIN_S:
            await asyncio.sleep(remaining - SPIN_MARGIN_S)
        while (now := time.monotonic()) < deliver_at:
            await asyncio.sleep(0)
        late = now - deliver_at
        s = self._stats
        s["waits"] += 1
        s["wait_late_sum_s"] += late
        s["wait_late_max_s"] = max(s["wait_late_max_s"], late)
        s["wait_target_sum_s"] += max(0.0, remaining)

    def report_fidelity(self) -> None:
        """Send the wait lateness so far to the simulator (telemetry: host keeps up?)."""
        if self._pump is None or self._closed:
            return
        s = self._stats
        try:
            self._pump.send(encode(FidelityReport(self.name, self._npu, s["waits"], s["wait_late_sum_s"],
                                                  s["wait_late_max_s"])))
        except SendQueueFull:
            pass  # a report is advisory; the next one carries the cumulative numbers

    # ---- request/reply ------------------------------------------------------------------
    async def _request(self, rid: int, msg: Register | Reserve, timeout_s: float, *, degrade: bool) -> Any:
        assert self._pump is not None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        timer = loop.call_later(timeout_s, self._expire, rid, timeout_s)
        self._pending[rid] = _Pending(fut, timer, time.monotonic(), degrade)
        try:
            self._pump.send(encode(msg), wanted=lambda: rid in self._pending)
        except SendQueueFull as exc:
            self._miss(rid, f"not taking requests: {exc}")
        try:
            return await fut
        finally:
            entry = self._pending.pop(rid, None)
            if entry is not None:  # cancelled by our caller
                entry.timer.cancel()

    def _settle(self, rid: int, *, result: Any = None, exc: BaseException | None = None) -> None:
        entry = self._pending.pop(rid, None)
        if entry is None:
            return
        entry.timer.cancel()
        if entry.fut.done():
            return
        if exc is not None:
            self._stats["failures"] += 1
            entry.fut.set_exception(exc)
        else:
            entry.fut.set_result(result)

    def _expire(self, rid: int, timeout_s: float) -> None:
        if rid in self._pending:
            self._miss(rid, f"did not answer within {timeout_s:g}s")

    def _miss(self, rid: int, reason: str) -> None:
        """No answer for ``rid``: a reservation goes on unmodelled; a registration fails."""
        entry = self._pending.get(rid)
        if entry is None or self._closed:
            return
        self._stats["unavailable"] += 1
        if not entry.degrade:
            self._settle(rid, exc=FabricUnavailable(f"fabric simulator at {self.address} {reason}"))
            return
        self.link.settle_unmodelled()
        self._settle(rid, result=None)
        self._apply(self.link.missed(time.monotonic(), reason))
        self._notify()

    def _on_monitor(self, batch: list[list[bytes]]) -> None:
        if self._closed:
            return
        for frames in batch:
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_DISCONNECTED and self.link.modelled:
                self._stats["disconnects"] += 1
                self._apply(self.link.missed(time.monotonic(), "connection to the simulator closed"))
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and not self.link.modelled:
                if self._probe_timer is not None:   # probe now, not at the next interval
                    self._probe_timer.cancel()
                    self._probe_timer = None
                self._apply(self.link.probe(time.monotonic()))

    def _notify(self) -> None:
        for watcher in self.watchers:
            watcher()

    def _apply(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, WentUnmodelled):
                # Everything in flight was sent to the same silent simulator: release it now.
                stuck = [rid for rid, p in self._pending.items() if p.degrade]
                for rid in stuck:
                    self.link.settle_unmodelled()
                    self._settle(rid, result=None)
                self._stats["last_outage_reason"] = e.reason
                log.warning("fabric.unavailable", name=self.name, npu=self._npu, address=self.address,
                            reason=e.reason, outage=e.outage, released=len(stuck),
                            note="timing stays modelled over the shared link table" if self._local is not None
                            else "transfers proceed unmodelled until the simulator answers again")
            elif isinstance(e, SendProbe):
                self._probe(e.next_at)
            elif isinstance(e, CameBack):
                if self._probe_timer is not None:
                    self._probe_timer.cancel()
                    self._probe_timer = None
                self._probe_rid = 0
                log.info("fabric.back", name=self.name, npu=self._npu, epoch=self.epoch,
                         outage_s=round(e.outage_s, 3), unmodelled_transfers=e.unmodelled, restarted=e.restarted)
            elif isinstance(e, EpochChanged):
                log.info("fabric_client.reregistered", name=self.name, npu=self._npu, epoch=e.epoch)
        if effects:
            self._notify()

    def _probe(self, next_at: float) -> None:
        """Send one Register (only the newest probe stays queued while disconnected)."""
        if self._pump is None or self._closed:
            return
        rid = -next(self._ids)
        self._probe_rid = rid
        try:
            self._pump.send(encode(Register(rid, self.name, self._npu)),
                            wanted=lambda: self._probe_rid == rid and not self._closed)
        except SendQueueFull:
            pass  # the next probe tries again
        loop = asyncio.get_running_loop()
        self._probe_timer = loop.call_at(loop.time() + max(0.0, next_at - time.monotonic()), self._on_probe_due)

    def _on_probe_due(self) -> None:
        self._probe_timer = None
        if not self._closed and not self.link.modelled:
            self._apply(self.link.probe(time.monotonic()))

    def _on_batch(self, batch: list[list[bytes]]) -> None:
        now = time.monotonic()
        for frames in batch:
            try:
                reply = decode(frames, expect=REPLIES)
            except WireError as exc:
                self._stats["bad_replies"] += 1
                log.warning("fabric_client.bad_reply", error=str(exc))
                continue
            self._on_reply(reply, now)

    def _on_reply(self, reply: Any, now: float) -> None:
        if self._closed:
            return
        if (reply.epoch != self.epoch and self.epoch is not None and not isinstance(reply, Registered)
                and self.link.modelled):
            self._stats["epoch_changes"] += 1
            self._reregister()
        entry = self._pending.get(reply.req_id)
        if entry is None:
            if isinstance(reply, Registered):   # a re-registration or probe ack
                self._registered(reply, now)
            else:
                self._stats["stray_replies"] += 1  # late: its caller stopped waiting
                self._notify()
            return
        rtt = now - entry.sent_at
        s = self._stats
        if isinstance(reply, Granted):
            s["grants"] += 1
            s["last_rtt_s"] = rtt
            s["rtt_sum_s"] += rtt
            s["rtt_max_s"] = max(s["rtt_max_s"], rtt)
            self._settle(reply.req_id, result=reply.delay_s)
        elif isinstance(reply, Refused):
            s["refusals"] += 1
            self._settle(reply.req_id, exc=LinkDown(f"fabric refused transfer from npu{self._npu}: "
                                                    f"{reply.reason}", link=reply.link))
        elif isinstance(reply, Registered):
            self._registered(reply, now)
            self._settle(reply.req_id, result=reply)
        elif isinstance(reply, Failed):
            self._settle(reply.req_id, exc=_rejected(reply.reason) if reply.code == BAD_REQUEST
                         else FabricRequestError(f"fabric simulator rejected the request: {reply.reason}"))

    def _registered(self, reply: Registered, now: float) -> None:
        self._attach()   # a restarted simulator made a new table
        self.time_scale = reply.time_scale
        self._npus = reply.npus
        self._stats["registrations"] += 1
        self._reregister_sent_at = -1e9
        self.epoch = reply.epoch
        self._apply(self.link.registered(reply.epoch, now))

    def _reregister(self) -> None:
        """Simulator restarted: register again, without blocking anyone on the answer."""
        now = time.monotonic()
        # One attempt in flight at a time; a lost one is retried on the next stale reply.
        if self._pump is None or self._closed or now - self._reregister_sent_at < _REREGISTER_TIMEOUT_S:
            return
        self._reregister_sent_at = now
        try:
            self._pump.send(encode(Register(-next(self._ids), self.name, self._npu)))
        except SendQueueFull:
            self._reregister_sent_at = -1e9
