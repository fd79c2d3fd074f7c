"""XCCL over ZeroMQ TCP, for peers that share no memory (other hosts).

Sockets: one ROUTER per endpoint (listens at ``cfg.bind`` or ``cfg.directory[name]``;
``:0`` picks a free port, see ``address``) receives requests and chunks; one DEALER per peer
(identity = our name) sends them and receives the peer's acks and replies on the same
connection. Messages are ``xccl_net.p2p_wire`` classes encoded with ``services.common.wire``;
payloads are raw frames (zero-copy above 64 KiB).

asyncio integration is a minimal adapter (MEASUREMENTS.md: ``zmq.asyncio`` costs ~75 us per
round trip): non-blocking recv driven by ``loop.add_reader`` on the zmq FD. The FD is
edge-triggered and a send can consume the edge, so every callback drains until EAGAIN and
every send schedules one more drain.

A socket monitor on each DEALER turns a dropped connection into ``PeerUnreachable`` at once
(a SIGKILLed peer), instead of waiting for the operation timeout.
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from services.common.logging import get_logger
from services.common.wire import WireError, decode, encode
from xccl_net.endpoint import EndpointConfig
from xccl_net.errors import PeerUnreachable
from xccl_net.msg_endpoint import MsgEndpoint
from xccl_net.p2p_wire import Ack, Chunk, GetReq, Hello, HelloReply, Message, PutReq, Reply

_ZERO_COPY_MIN = 64 * 1024
_DRAIN_BATCH = 256
_TO_ROUTER = (Hello, Chunk, PutReq, GetReq)
_TO_DEALER = (HelloReply, Ack, Reply)

log = get_logger(component="xccl.tcp")


def _send(sock: zmq.Socket, frames: list[Any]) -> None:
    last = len(frames) - 1
    for i, f in enumerate(frames):
        nbytes = memoryview(f).nbytes
        sock.send(f, flags=zmq.NOBLOCK | (zmq.SNDMORE if i < last else 0), copy=nbytes < _ZERO_COPY_MIN)


class TcpEndpoint(MsgEndpoint):
    def __init__(self, cfg: EndpointConfig, fabric: Any = None) -> None:
        super().__init__(cfg, fabric)
        self._ctx = zmq.Context.instance()
        self._directory = dict(cfg.directory)
        self._router: zmq.Socket | None = None
        self._dealers: dict[str, zmq.Socket] = {}
        self._monitors: dict[str, zmq.Socket] = {}
        self._to_drain: set[zmq.Socket] = set()
        self._drain_scheduled = False
        self.address = ""

    # ---------------------------------------------------------------- lifecycle
    async def _open(self) -> None:
        where = self.cfg.bind or self._directory.get(self.name) or "tcp://127.0.0.1:0"
        if where.endswith(":0"):
            where = where[:-2] + ":*"
        r = self._ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over its identity
        r.setsockopt(zmq.SNDHWM, 0)
        r.setsockopt(zmq.RCVHWM, 0)
        self._router = r
        r.bind(where)
        self.address = r.getsockopt_string(zmq.LAST_ENDPOINT)
        self._directory[self.name] = self.address
        self._loop.add_reader(r.getsockopt(zmq.FD), self._drain_sock, r)

    async def _close(self) -> None:
        await super()._close()
        for peer in list(self._dealers):
            self._drop_dealer(peer)
        if self._router is not None:
            self._loop.remove_reader(self._router.getsockopt(zmq.FD))
            self._router.close(0)
            self._router = None

    def set_peer_address(self, peer: str, address: str) -> None:
        """Learn (or change) where ``peer`` listens; a changed address reconnects."""
        if self._directory.get(peer) != address:
            self._directory[peer] = address
            if peer in self._dealers:
                self._drop_dealer(peer)

    # ---------------------------------------------------------------- sockets
    def _dealer(self, peer: str) -> zmq.Socket:
        sock = self._dealers.get(peer)
        if sock is not None:
            return sock
        addr = self._directory.get(peer)
        if addr is None or peer == self.name:
            raise PeerUnreachable(f"{self.name}: {peer!r} is not in the directory")
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.name.encode())
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(addr)
        self._dealers[peer] = sock
        self._monitors[peer] = mon
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain_sock, sock, peer)
        self._loop.add_reader(mon.getsockopt(zmq.FD), self._on_monitor, peer)
        return sock

    def _drop_dealer(self, peer: str) -> None:
        sock = self._dealers.pop(peer, None)
        mon = self._monitors.pop(peer, None)
        if mon is not None:
            self._loop.remove_reader(mon.getsockopt(zmq.FD))
        if sock is not None:
            self._to_drain.discard(sock)
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
            sock.disable_monitor()
            sock.close(0)
        if mon is not None:
            mon.close(0)

    def _on_monitor(self, peer: str) -> None:
        mon = self._monitors.get(peer)
        while mon is not None and mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                evt = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            if evt["event"] == zmq.EVENT_DISCONNECTED:
                self._peer_lost(peer, PeerUnreachable(f"{self.name}: connection to {peer} lost"))

    def _kick(self, sock: zmq.Socket) -> None:
        self._to_drain.add(sock)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain_kicked)

    def _drain_kicked(self) -> None:
        self._drain_scheduled = False
        socks, self._to_drain = self._to_drain, set()
        for sock in socks:
            if sock is self._router:
                self._drain_sock(sock)
            else:
                peer = next((p for p, s in self._dealers.items() if s is sock), None)
                if peer is not None:
                    self._drain_sock(sock, peer)

    def _drain_sock(self, sock: zmq.Socket, peer: str | None = None) -> None:
        for _ in range(_DRAIN_BATCH):
            if self._closed or sock.closed:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if peer is None:
                src = bytes(frames[0].buffer).decode("utf-8", "replace")
                self._on_frames(src, [f.buffer for f in frames[1:]], frames[0].bytes, _TO_ROUTER)
            else:
                self._on_frames(peer, [f.buffer for f in frames], None, _TO_DEALER)
        self._kick(sock)  # more pending: continue next iteration, let others run

    def _on_frames(self, src: str, frames: list[memoryview], reply_to: Any, expect: tuple[type, ...]) -> None:
        try:
            msg = decode(frames, expect=expect)
        except WireError as exc:
            self.stats["protocol_errors"] += 1
            log.warning("xccl.tcp.bad_message", peer=src, error=str(exc))
            return
        self._on_message(src, msg, reply_to)

    # ---------------------------------------------------------------- MsgEndpoint hooks
    def _transmit(self, peer: str, msg: Message) -> None:
        sock = self._dealer(peer)
        _send(sock, encode(msg))
        self._kick(sock)

    def _respond(self, reply_to: Any, msg: Message) -> None:
        r = self._router
        if r is None or reply_to is None:
            return
        try:
            _send(r, [reply_to, *encode(msg)])
        except zmq.ZMQError as exc:  # the requester is gone (EHOSTUNREACH) or we are closing
            log.info("xccl.tcp.reply_dropped", error=str(exc))
        self._kick(r)
