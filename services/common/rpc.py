"""Request/reply and one-way messages between services over ZeroMQ (ROUTER server, DEALER client).

Frames: ``[request_id (8 bytes LE), *wire.encode(msg)]``. ``request_id`` 0 marks a one-way
message (no reply). A handler's ``status.Refused`` (``RemoteError`` is one) travels back as
``rpc.Failed`` and is raised again at the caller as ``RemoteError`` with the same code; any
other handler exception becomes ``INTERNAL``
(logged with its traceback at the server, which stays up). Garbage frames from a peer are
answered with ``INVALID_ARGUMENT`` when they carry a request id, else counted and dropped.
Every call has a timeout: ``RpcTimeout`` — the peer may be dead, hung or just slow.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq

from services.common.logging import get_logger
from services.common.status import Code, Refused
from services.common.wire import WireError, decode, encode, message
from services.common.zmqio import ZmqPump

log = get_logger()
_ID = struct.Struct("<Q")

@message("rpc.Failed")
@dataclass(frozen=True, slots=True)
class Failed:
    code: Code
    message: str


@message("rpc.Ok")
@dataclass(frozen=True, slots=True)
class Ok:
    pass


class RpcError(Exception):
    """Base of RPC errors."""


class RemoteError(RpcError, Refused):
    """The peer handled the request and refused it (``code``: a ``status.Code``)."""


class RpcTimeout(RpcError):
    """No reply within the timeout: the peer may be dead, hung, or overloaded."""


Handler = Callable[[Any, bytes], Awaitable[Any]]


class RpcServer:
    """ROUTER socket; ``handler(msg, peer_identity)`` returns the reply (or None for one-way)."""

    def __init__(self, address: str, handler: Handler, *, ctx: zmq.Context | None = None,
                 max_inflight: int = 1024) -> None:
        self._handler = handler
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished peer's reply is dropped
        self._sock.bind(address)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pump = ZmqPump(self._sock, self._on_batch)
        self._tasks: set[asyncio.Task] = set()
        self._max_inflight = max_inflight
        self.bad_messages = 0

    def start(self) -> None:
        self._pump.start()

    def push(self, identity: bytes, msg: Any) -> None:
        """One-way message to a connected client (e.g. streamed tokens)."""
        self._pump.send([identity, _ID.pack(0), *encode(msg)])

    def _on_batch(self, batch: list[list[bytes]]) -> None:
        for frames in batch:
            if len(frames) < 2 or len(frames[1]) != _ID.size:
                self.bad_messages += 1
                continue
            ident, rid = frames[0], _ID.unpack(frames[1])[0]
            if len(self._tasks) >= self._max_inflight:
                if rid:
                    self._reply(ident, rid, Failed(Code.RESOURCE_EXHAUSTED, "server has too many requests in flight"))
                continue
            t = asyncio.get_running_loop().create_task(self._serve(ident, rid, frames[2:]))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _serve(self, ident: bytes, rid: int, frames: list[bytes]) -> None:
        try:
            msg = decode(frames)
        except WireError as exc:
            self.bad_messages += 1
            log.warning("rpc.bad_message", error=str(exc))
            if rid:
                self._reply(ident, rid, Failed(Code.INVALID_ARGUMENT, f"undecodable message: {exc}"))
            return
        try:
            reply = await self._handler(msg, ident)
        except asyncio.CancelledError:
            raise
        except Refused as exc:
            reply = Failed(exc.code, exc.message)
        except Exception as exc:  # a handler bug must not take the service down
            log.exception("rpc.handler_failed", msg_type=type(msg).__name__)
            reply = Failed(Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        if rid:
            self._reply(ident, rid, reply if reply is not None else Ok())

    def _reply(self, ident: bytes, rid: int, reply: Any) -> None:
        self._pump.send([ident, _ID.pack(rid), *encode(reply)])

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pump.stop()
        self._sock.close(0)


class RpcClient:
    """DEALER socket to one server; concurrent calls matched by request id."""

    def __init__(self, address: str, *, ctx: zmq.Context | None = None,
                 on_push: Callable[[Any], None] | None = None) -> None:
        self.address = address
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 20)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
        self._sock.connect(address)
        self._pump = ZmqPump(self._sock, self._on_batch)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._on_push = on_push
        self._started = False
        self.bad_replies = 0

    def _ensure_started(self) -> None:
        if not self._started:
            self._pump.start()
            self._started = True

    async def call(self, msg: Any, *, timeout_s: float = 5.0) -> Any:
        """Send ``msg``; return the reply message; raise RemoteError / RpcTimeout."""
        self._ensure_started()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._pump.send([_ID.pack(rid), *encode(msg)], wanted=lambda: not fut.done())
            reply = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise RpcTimeout(f"no reply from {self.address} to {type(msg).__name__} within {timeout_s:g}s") from None
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, Failed):
            # A peer that "fails" with OK broke the protocol: no code we could act on.
            raise RemoteError(Code.UNKNOWN if reply.code is Code.OK else reply.code, reply.message)
        return reply

    def send(self, msg: Any) -> None:
        """One-way message (no reply, no delivery guarantee beyond ZeroMQ's)."""
        self._ensure_started()
        self._pump.send([_ID.pack(0), *encode(msg)])

    def _on_batch(self, batch: list[list[bytes]]) -> None:
        for frames in batch:
            try:
                rid = _ID.unpack(frames[0])[0]
                msg = decode(frames[1:])
            except (struct.error, IndexError, WireError) as exc:
                self.bad_replies += 1
                log.warning("rpc.bad_reply", error=str(exc))
                continue
            if rid == 0:
                if self._on_push is not None:
                    self._on_push(msg)
                continue
            fut = self._pending.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def close(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        if self._started:
            self._pump.stop()
        self._sock.close(0)
