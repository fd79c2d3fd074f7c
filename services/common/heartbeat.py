"""Heartbeat plane: every service PUBlishes status + load; routers and masters SUBscribe.

Beats are sent from the service's own event loop (never a side thread): when that loop hangs,
beats stop, and the failure detector (``liveness.FailureDetector``) sees silence. There is no
central registry: each subscriber connects to every publisher address the pod spec lists and
forms its own view.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import zmq

from services.common.zmqio import ZmqPump
from services.common.liveness import Change, DetectorConfig, FailureDetector
from services.common import metrics
from services.common.logging import get_logger
from services.common.wire import WireError, decode, encode, message

log = get_logger()


@message("heartbeat.Beat")
@dataclass(frozen=True, slots=True)
class Beat:
    service: str            # unique name in the pod, e.g. "decode-1"
    role: str               # router | prefill | decode | attention | moe-expert | kv-pool
    epoch: str              # new at every process start
    seq: int                # increases by one per beat within an epoch
    status: str = "serving"  # serving | draining
    group: int = -1         # DP group for decode/attention, else -1
    load: dict[str, float] = field(default_factory=dict)  # running, queued, free_kv_blocks, ...


def new_epoch() -> str:
    return uuid.uuid4().hex[:12]


EXIT_STALE = 75  # EX_TEMPFAIL: the exit code of a process that ended its stale incarnation


class StaleIncarnation(RuntimeError):
    """This process went silent for longer than its peers' dead-after window (it was stopped,
    or its loop was wedged): they may have declared this epoch dead and moved its work, and
    ``dead`` is final for an epoch. The process must not go on as if nothing happened; it
    ends, and its supervisor starts a new incarnation (new PID, new epoch)."""

    def __init__(self, service: str, silent_s: float, limit_s: float) -> None:
        super().__init__(f"{service}: silent for {silent_s:.2f}s, beyond the dead-after window of {limit_s:g}s: "
                         "peers may have declared this incarnation dead")
        self.service, self.silent_s, self.limit_s = service, silent_s, limit_s


def stale_after(interval_s: float, dead_after_s: float) -> float:
    """The publisher's own limit for a pod whose peers declare death after ``dead_after_s``:
    two beat intervals of margin for delivery and the subscribers' ticks."""
    return dead_after_s - 2 * interval_s


def next_slot(now: float, interval_s: float) -> float:
    """When to beat next: the next multiple of ``interval_s`` on the monotonic clock that is at
    least half an interval away (a timer that fired a little early must not beat twice).

    Every process on a host shares CLOCK_MONOTONIC, so all the pod's publishers beat at the
    same instants: a subscriber hears its peers' beats together, and in the same wake-up as
    its own beat, instead of one wake-up per beat (an idle pod's main cost). Beats stay
    between half and one and a half intervals apart, one interval when on time."""
    return math.ceil((now + interval_s / 2) / interval_s) * interval_s


class HeartbeatPublisher:
    """Publishes a Beat every ``interval_s`` from the running loop; ``load()`` supplies the load.

    With ``stale_after_s``, ``run`` raises ``StaleIncarnation`` instead of beating again when
    two beats are further apart than that: the process was hung (SIGSTOP, a wedged loop) long
    enough that peers may have declared it dead. It must be somewhat below the peers'
    dead-after window (see ``stale_after``): a peer's silence clock starts when a beat
    arrives and it looks only every tick, so a publisher that waited for the exact window
    could wake just under it, beat on, and be ignored for ever as a dead epoch.
    """

    def __init__(self, address: str, *, service: str, role: str, group: int = -1,
                 interval_s: float = 0.2, load: Callable[[], Mapping[str, float]] = dict,
                 ctx: zmq.Context | None = None, stale_after_s: float | None = None,
                 on_stale: Callable[[StaleIncarnation], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stale_after_s is not None and stale_after_s <= interval_s:
            raise ValueError(f"stale_after_s ({stale_after_s}) must exceed interval_s ({interval_s})")
        self.service, self.role, self.group, self.interval_s = service, role, group, interval_s
        self.stale_after_s, self._clock = stale_after_s, clock
        self._on_stale = on_stale or (lambda exc: None)
        self.epoch = new_epoch()
        self.status = "serving"
        self._load = load
        self._seq = 0
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 16)  # stale beats are worthless: drop, don't queue
        self._sock.bind(address)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def beat_now(self) -> None:
        self._seq += 1
        beat = Beat(self.service, self.role, self.epoch, self._seq, self.status, self.group,
                    {k: float(v) for k, v in self._load().items()})
        try:
            self._sock.send_multipart(encode(beat), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # no subscriber keeps up: the next beat supersedes this one

    async def run(self) -> None:
        try:
            while True:
                last = self._clock()  # before the send: a subscriber's silence starts no earlier
                self.beat_now()
                await asyncio.sleep(next_slot(last, self.interval_s) - last)
                silent = self._clock() - last
                if self.stale_after_s is not None and silent > self.stale_after_s:
                    log.error("heartbeat.stale_incarnation", service=self.service, epoch=self.epoch,
                              silent_s=round(silent, 3), dead_after_s=self.stale_after_s)
                    exc = StaleIncarnation(self.service, silent, self.stale_after_s)
                    self._on_stale(exc)
                    raise exc
        finally:
            self._sock.close(0)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class HeartbeatSubscriber:
    """Connects to every publisher, feeds a FailureDetector, reports changes to ``on_change``.

    The detector is ticked when its next deadline is due (``FailureDetector.next_due``), not
    on a fixed period: an idle pod whose peers all beat wakes for the beats alone, and a
    silent peer is declared suspect/dead at its deadline. ``tick_s`` (optional) additionally
    caps the wait between two ticks.
    """

    def __init__(self, addresses: Sequence[str], *, detector: FailureDetector | None = None,
                 on_change: Callable[[Change], None] | None = None,
                 on_beat: Callable[[Beat], None] | None = None, tick_s: float | None = None,
                 ctx: zmq.Context | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.detector = detector or FailureDetector(DetectorConfig())
        self._on_change = on_change or (lambda c: None)
        self._on_beat = on_beat or (lambda b: None)
        self._tick_s, self._clock = tick_s, clock
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        for a in addresses:
            self._sock.connect(a)
        self._pump = ZmqPump(self._sock, self._on_batch)
        self.bad_beats = 0
        self.latest: dict[str, Beat] = {}
        self._rearm: asyncio.Future[None] | None = None   # the tick wait; done early when a deadline appears

    def connect(self, address: str) -> None:
        self._sock.connect(address)

    def _emit(self, changes: list[Change]) -> None:
        for c in changes:
            log.info("liveness.change", peer=c.peer, old=c.old and c.old.value, new=c.new.value, epoch=c.epoch)
            metrics.peer_state(c.peer, c.new.value)
            self._on_change(c)

    def _on_batch(self, batch: list[list[bytes]]) -> None:
        now = self._clock()
        for frames in batch:
            try:
                beat = decode(frames, expect=Beat)
            except WireError as exc:
                self.bad_beats += 1
                log.warning("heartbeat.bad", error=str(exc))
                continue
            prev = self.latest.get(beat.service)
            if prev is not None and prev.epoch == beat.epoch and beat.seq <= prev.seq:
                continue  # duplicate or reordered beat
            self.latest[beat.service] = beat
            info = {"role": beat.role, "group": beat.group, "status": beat.status, **beat.load}
            changes = self.detector.observe(beat.service, beat.epoch, now, info)
            if changes and self._rearm is not None and not self._rearm.done():
                self._rearm.set_result(None)   # a new or revived peer: its deadline may come first
            self._emit(changes)
            self._on_beat(beat)

    async def run(self) -> None:
        self._pump.start()
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._emit(self.detector.tick(self._clock()))
                due = self.detector.next_due()
                wait = None if due is None else max(due - self._clock(), 0.0)
                if self._tick_s is not None:
                    wait = self._tick_s if wait is None else min(wait, self._tick_s)
                self._rearm = loop.create_future()
                timer = None if wait is None else loop.call_later(wait, _settle, self._rearm)
                try:
                    await self._rearm
                finally:
                    if timer is not None:
                        timer.cancel()
        finally:
            self._pump.stop()
            self._sock.close(0)
