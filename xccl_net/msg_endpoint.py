"""XCCL over a message transport (tcp, mem): the ring becomes credits, memory stays local.

Used when peers share no memory. The receiver keeps its windows in local memory and applies
put/get for the remote peer. Semantics match the shm endpoint:
- a message is cut into chunks of the receiver's slot size; at most ``ring_slots`` chunks per
  pair are unconsumed at any time (credits = the ring); the receiver consumes a chunk only
  when its inbox has room, so a slow receiver back-pressures the sender, nothing is dropped;
- the receiver acknowledges with (head, last event, optional NACK); send() completes on it;
- put completes when the receiver applied the bytes (and queued the notification).
Lossy transports (the mem double with faults): a chunk whose send timed out is forgiven
(its credit returns), and the next message carries FLAG_RESET, so one loss costs exactly
one XcclTimeout. Chunks carry both incarnations, so a restarted peer is never confused
with its previous life.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xccl_net.endpoint import Endpoint, EndpointConfig, Notification, window_slice
from xccl_net.errors import CorruptMetadata, PeerUnreachable, ProtocolError, WindowError, XcclError
from xccl_net.p2p_wire import Ack, Chunk, GetReq, Hello, HelloReply, Message, PutReq, Reply
from xccl_net.p2p_core import (
    FLAG_RESET, KIND_DATA, KIND_NOTIFY, NACK_CODES, NACK_ERRORS, ChunkHeader, Delivered, Discarded,
    Reassembler, Violation, gather_into, n_chunks_for, split_message,
)


@dataclass(eq=False)
class _Peer:
    name: str
    npu: int
    incarnation: int
    ring_slots: int
    slot_bytes: int
    tail: int = 0
    head: int = 0
    forgiven: int = 0
    acked: int = 0
    nacks: dict[int, int] = field(default_factory=dict)
    next_event: int = 1
    need_reset: bool = False
    dead: XcclError | None = None
    waiters: list = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def space(self) -> int:
        return self.ring_slots - (self.tail - self.forgiven - self.head)


@dataclass(eq=False)
class _Inbound:
    reasm: Reassembler
    pending: deque = field(default_factory=deque)
    head: int = 0


class MsgEndpoint(Endpoint):
    """Shared logic of tcp and mem; subclasses move ``Message`` objects."""

    def __init__(self, cfg: EndpointConfig, fabric: Any = None) -> None:
        super().__init__(cfg, fabric)
        self.incarnation = random.getrandbits(62) | 1
        self._peers: dict[str, _Peer] = {}
        self._inbound: dict[tuple[str, int], _Inbound] = {}
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._request_peer: dict[int, str] = {}
        self._req_ids = itertools.count(1)
        self._windows: dict[str, np.ndarray] = {n: np.zeros(size, dtype=np.uint8) for n, size in cfg.windows.items()}

    # ---------------------------------------------------------------- transport hooks
    @abstractmethod
    def _transmit(self, peer: str, msg: Message) -> None:
        """Send to ``peer`` (a request or a chunk); PeerUnreachable if it cannot be addressed."""

    @abstractmethod
    def _respond(self, reply_to: Any, msg: Message) -> None:
        """Send a reply/ack back on the path ``reply_to`` the request came from."""

    def window(self, name: str) -> np.ndarray:
        self._check_open()
        win = self._windows.get(name)
        if win is None:
            raise WindowError(f"{self.name} has no window {name!r} (has {sorted(self._windows)})")
        return win

    async def _close(self) -> None:
        for p in self._peers.values():
            self._wake(p.waiters)
        for fut in self._requests.values():
            if not fut.done():
                fut.cancel()
        self._requests.clear()

    # ---------------------------------------------------------------- requests
    async def _request(self, peer: str, make: Any) -> Any:
        req_id = next(self._req_ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._requests[req_id] = fut
        self._request_peer[req_id] = peer
        try:
            self._transmit(peer, make(req_id))
            return await fut
        finally:
            self._requests.pop(req_id, None)
            self._request_peer.pop(req_id, None)

    def _peer_lost(self, peer: str, why: XcclError) -> None:
        """The transport saw ``peer`` go away: fail everything waiting on it now, not at timeout."""
        p = self._peers.get(peer)
        if p is not None:
            p.dead = why
            self._wake(p.waiters)
        for req_id, name in list(self._request_peer.items()):
            fut = self._requests.get(req_id)
            if name == peer and fut is not None and not fut.done():
                fut.set_exception(why)

    async def _peer(self, peer: str) -> _Peer:
        p = self._peers.get(peer)
        if p is not None and p.dead is None:
            return p
        if peer == self.name:
            raise PeerUnreachable(f"{self.name}: send to self is not supported")
        try:
            async with asyncio.timeout(self.cfg.handshake_timeout_s):
                rep = await self._request(peer, lambda r: Hello(r, self.name, self.npu, self.incarnation))
        except TimeoutError:
            raise PeerUnreachable(f"{self.name}: {peer} did not answer the handshake in "
                                  f"{self.cfg.handshake_timeout_s} s") from None
        if not isinstance(rep, HelloReply) or rep.name != peer:
            raise PeerUnreachable(f"{self.name}: bad handshake answer from {peer}")
        p = self._peers.get(peer)
        if p is None or p.dead is not None or p.incarnation != rep.incarnation:
            p = _Peer(peer, rep.npu, rep.incarnation, rep.ring_slots, rep.slot_bytes)
            self._peers[peer] = p
        return p

    async def _wait_peer(self, p: _Peer) -> None:
        await self._park(p.waiters, self.cfg.poll_s)
        self._check_open()
        if p.dead is not None:
            raise p.dead

    # ---------------------------------------------------------------- send side
    async def _send(self, peer: str, kind: int, pieces: list[memoryview], total: int, wait_ack: bool) -> None:
        p = await self._peer(peer)
        await self._fabric_delay(p.npu, total)
        n = n_chunks_for(total, p.slot_bytes)
        async with p.lock:  # chunks of one message stay contiguous; acks are awaited outside
            ev = p.next_event
            p.next_event += 1
            flags = FLAG_RESET if p.need_reset else 0
            p.need_reset = True
            sent = 0
            try:
                for k in range(n):
                    while p.space() <= 0:
                        self.stats["ring_waits"] += 1
                        await self._wait_peer(p)
                    lo = k * p.slot_bytes
                    nb = min(p.slot_bytes, total - lo)
                    payload = np.empty(nb, dtype=np.uint8)
                    gather_into(memoryview(payload), pieces, lo)
                    self._transmit(peer, Chunk(self.incarnation, p.incarnation, ev, k, n, total, kind,
                                               flags if k == 0 else 0, payload))
                    p.tail += 1
                    sent += 1
            except (asyncio.CancelledError, XcclError):
                p.forgiven += sent  # a partial message is abandoned: its credits come back
                raise
            p.need_reset = False
        if not wait_ack:
            return
        try:
            while ev not in p.nacks and p.acked < ev:
                await self._wait_peer(p)
        except (asyncio.CancelledError, XcclError):
            if p.acked < ev:
                # Presumed lost (see module doc): credits back, and the next message tells the
                # receiver that a gap before it is expected.
                p.forgiven += sent
                p.need_reset = True
            raise
        code = p.nacks.pop(ev, 0)
        if code:
            raise NACK_ERRORS.get(code, ProtocolError)(f"{peer} rejected event {ev} (code {code})")

    async def _put(self, peer: str, window: str, offset: int, data: memoryview, notify: bytes | None) -> None:
        p = await self._peer(peer)
        await self._fabric_delay(p.npu, data.nbytes)
        arr = np.frombuffer(data, dtype=np.uint8)
        rep = await self._request(peer, lambda r: PutReq(r, window, offset, arr, notify))
        self._raise_reply(peer, rep)

    async def _get(self, peer: str, window: str, offset: int, nbytes: int) -> bytes | memoryview:
        p = await self._peer(peer)
        rep = await self._request(peer, lambda r: GetReq(r, window, offset, nbytes))
        self._raise_reply(peer, rep)
        await self._fabric_delay(p.npu, nbytes)
        return memoryview(rep.data).cast("B") if rep.data.nbytes else b""

    @staticmethod
    def _raise_reply(peer: str, rep: Any) -> None:
        if not isinstance(rep, Reply):
            raise CorruptMetadata(f"{peer} answered with {type(rep).__name__}")
        if rep.error == "window":
            raise WindowError(rep.detail)
        if rep.error:
            raise ProtocolError(f"{peer}: {rep.error}: {rep.detail}")

    # ---------------------------------------------------------------- receive side
    def _on_message(self, src: str, msg: Message, reply_to: Any) -> None:
        """Entry point of every inbound message (after decoding, for tcp)."""
        if self._closed:
            return
        if isinstance(msg, Chunk):
            self._on_chunk(src, msg, reply_to)
        elif isinstance(msg, Ack):
            self._on_ack(src, msg)
        elif isinstance(msg, (HelloReply, Reply)):
            fut = self._requests.get(msg.req_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Hello):
            self._respond(reply_to, HelloReply(msg.req_id, self.name, self.npu, self.incarnation,
                                               self.cfg.ring_slots, self.cfg.slot_bytes))
        elif isinstance(msg, PutReq):
            self._respond(reply_to, self._apply_put(src, msg))
        elif isinstance(msg, GetReq):
            try:
                view = window_slice(self._windows, msg.window, msg.offset, msg.nbytes, self.name)
                self._respond(reply_to, Reply(msg.req_id, data=view.copy()))
            except WindowError as exc:
                self._respond(reply_to, Reply(msg.req_id, "window", str(exc)))

    def _apply_put(self, src: str, msg: PutReq) -> Reply:
        try:
            data = memoryview(msg.data).cast("B")
            dst = window_slice(self._windows, msg.window, msg.offset, data.nbytes, self.name)
        except WindowError as exc:
            return Reply(msg.req_id, "window", str(exc))
        except (TypeError, ValueError) as exc:
            return Reply(msg.req_id, "corrupt", str(exc))
        memoryview(dst)[:] = data
        if msg.notify is not None:
            self._deliver_notify(Notification(src, msg.window, msg.offset, data.nbytes, bytes(msg.notify)))
        return Reply(msg.req_id)

    def _on_ack(self, src: str, ack: Ack) -> None:
        p = self._peers.get(src)
        if p is None or ack.dst_inc != self.incarnation:
            return
        if ack.src_inc != p.incarnation:
            p.dead = PeerUnreachable(f"{self.name}: {src} restarted (incarnation changed)")
        else:
            p.head = max(p.head, ack.head)
            p.acked = max(p.acked, ack.acked_event)
            if ack.nack_event:
                p.nacks[ack.nack_event] = ack.nack_code
                while len(p.nacks) > 1024:
                    p.nacks.pop(next(iter(p.nacks)))
        self._wake(p.waiters)

    def _on_chunk(self, src: str, c: Chunk, reply_to: Any) -> None:
        if c.dst_inc != self.incarnation:
            # Addressed to our previous life: tell the sender we are someone new.
            self._respond(reply_to, Ack(self.incarnation, c.src_inc, 0, 0))
            return
        key = (src, c.src_inc)
        st = self._inbound.get(key)
        if st is None:
            for old in [k for k in self._inbound if k[0] == src]:
                del self._inbound[old]  # the sender restarted
            st = _Inbound(Reassembler(self.cfg.slot_bytes, self.cfg.max_message_bytes))
            self._inbound[key] = st
        st.pending.append((c, reply_to))
        self._drain(src, st)

    def _drain(self, src: str, st: _Inbound) -> None:
        last_reply: Any = None
        start = st.head
        while st.pending and self._inbox_has_room(KIND_DATA) and self._inbox_has_room(KIND_NOTIFY):
            c, last_reply = st.pending.popleft()
            try:
                payload = memoryview(c.payload).cast("B")
                h = ChunkHeader(int(c.event_id), int(c.chunk_id), int(c.n_chunks), int(c.total_bytes),
                                int(c.kind), int(c.flags))
                effects = st.reasm.on_chunk(h, payload)
            except (TypeError, ValueError) as exc:
                effects = [Violation(0, CorruptMetadata(f"malformed chunk: {exc}"))]
            st.head += 1
            for eff in effects:
                nack = self._apply(src, eff)
                if nack is not None:
                    self._respond(last_reply, Ack(self.incarnation, c.src_inc, st.head, st.reasm.last_event,
                                                  nack[0], nack[1]))
        if st.head != start and last_reply is not None:
            self._respond(last_reply, Ack(self.incarnation, c.src_inc, st.head, st.reasm.last_event))

    def _apply(self, src: str, eff: object) -> tuple[int, int] | None:
        if isinstance(eff, Delivered):
            try:
                if eff.kind == KIND_DATA:
                    self._deliver(src, split_message(eff.data), memoryview(eff.data).nbytes)
                    return None
                raise CorruptMetadata("notify records travel as PutReq on message transports")
            except CorruptMetadata as exc:
                return self._apply(src, Violation(eff.event_id, exc))
        if isinstance(eff, Violation):
            self._deliver_error(src, eff.error)
            return eff.event_id, NACK_CODES.get(type(eff.error), NACK_CODES[CorruptMetadata])
        if isinstance(eff, Discarded):
            self.stats["duplicates_discarded"] += 1
        return None

    def _on_inbox_space(self) -> None:
        self._loop.call_soon(self._drain_all)

    def _drain_all(self) -> None:
        if self._closed:
            return
        for (src, _), st in list(self._inbound.items()):
            if st.pending:
                self._drain(src, st)


__all__ = ["MsgEndpoint"]
