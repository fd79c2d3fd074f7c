"""XCCL endpoint: the one API every transport implements (shm, tcp, mem).

``open_endpoint(cfg, fabric=..., hub=...)`` returns a ready ``Endpoint``. The base class
owns what is identical everywhere: the bounded inbox and notification queue, timeouts,
fabric timing, statistics and the closed state. Subclasses move bytes.

Invariants:
- every public operation has a timeout and ends in a typed ``XcclError``, never a hang;
- a message is acknowledged when the receiver copied it out of its ring into the inbox;
  a full inbox stops the copying, so a slow receiver back-pressures its senders through
  the ring instead of losing data;
- with a non-ideal fabric, bytes become visible to the receiver no earlier than the
  delay the fabric reserved (``fabric.wait_until`` never returns early).

Receiving into the caller's buffer (``recv_into`` / ``post_recv``, see ``PostedRecv``): while
a receive from peer P is posted, P's next message goes into that buffer -- on shm the ring
chunks are gathered straight into it (one copy, no allocation); a message of P that was
already (being) received into a fresh buffer before the post is copied into it once. A shm
buffer inside one of our windows is offered to P, which writes its message straight into it
(one copy end to end, as put).
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from services.common.config import ConfigError
from xccl_net.errors import BufferTooSmall, EndpointClosed, PeerUnreachable, WindowError, XcclError, XcclTimeout
from xccl_net.p2p_core import KIND_DATA, as_byte_views, frame_prefix, pack_into
from xccl_net.posted_recv import PostedRecv, Received

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,48}$")
MAX_WINDOWS = 16


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    namespace: str = "default"
    kind: Literal["shm", "tcp", "mem"] = "shm"
    npu: int = 0
    ring_slots: int = 64
    slot_bytes: int = 256 * 1024
    windows: dict[str, int] = field(default_factory=dict)
    # Doorbell sockets: None = abstract namespace (one host network namespace); a directory =
    # socket files there, for peers in different network namespaces (containers). Every
    # endpoint of a namespace must use the same value.
    bell_dir: str | None = None
    # tcp: peer name -> "tcp://host:port"; our own entry (or ``bind``) is where we listen.
    directory: dict[str, str] = field(default_factory=dict)
    bind: str | None = None
    max_peers: int = 16
    inbox_max: int = 1024
    max_message_bytes: int = 1 << 30
    pretouch_windows: bool = True
    # Safety net only: waits re-check state and peer liveness this often even without a wake-up.
    poll_s: float = 0.05
    handshake_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for key, val in (("name", self.name), ("namespace", self.namespace)):
            if not _NAME.match(val):
                raise ConfigError(f"EndpointConfig.{key}", f"{val!r} must match {_NAME.pattern}")
        if self.ring_slots < 2:
            raise ConfigError("EndpointConfig.ring_slots", "must be >= 2")
        if self.slot_bytes < 256 or self.slot_bytes % 64:
            raise ConfigError("EndpointConfig.slot_bytes", "must be >= 256 and a multiple of 64")
        if not 1 <= self.max_peers <= 1024:
            raise ConfigError("EndpointConfig.max_peers", "must be in 1..1024")
        if self.inbox_max < 1:
            raise ConfigError("EndpointConfig.inbox_max", "must be >= 1")
        if len(self.windows) > MAX_WINDOWS:
            raise ConfigError("EndpointConfig.windows", f"at most {MAX_WINDOWS} windows")
        for wname, size in self.windows.items():
            if not _NAME.match(wname) or size < 0:
                raise ConfigError(f"EndpointConfig.windows.{wname}", "bad window name or negative size")
        if self.poll_s <= 0:
            raise ConfigError("EndpointConfig.poll_s", "must be > 0")


class Notification(NamedTuple):
    """What ``recv_notify`` returns: a put with ``notify`` became visible in our window."""

    src: str
    window: str
    offset: int
    nbytes: int
    notify: bytes


class PutSpec(NamedTuple):
    """One put of ``put_many``: ``data`` into ``peer``'s ``window`` at ``offset``, then ``notify``."""

    peer: str
    window: str
    offset: int
    data: Any
    notify: bytes | None = None


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class Endpoint(ABC):
    """Base of every transport; see the module doc for the contract."""

    def __init__(self, cfg: EndpointConfig, fabric: Any = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.npu = cfg.npu
        self.ready = asyncio.Event()
        self._fabric = fabric
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._inbox: deque[tuple[str, list[memoryview] | None, XcclError | None]] = deque()
        self._notes: deque[Notification] = deque()
        self._recv_waiters: list[asyncio.Future[bool]] = []
        self._note_waiters: list[asyncio.Future[bool]] = []
        self._posts: dict[str, PostedRecv] = {}
        self._draining: dict[int, PostedRecv] = {}  # released posts a peer is still writing into
        # The safety-net period of parked receives: cfg.poll_s; a transport that knows it is
        # idle may stretch it (ShmEndpoint._tick) and shrinks it back on activity.
        self._idle_poll_s = cfg.poll_s
        self.stats: dict[str, int] = dict.fromkeys((
            "bytes_sent", "bytes_received", "sends", "recvs", "puts", "gets", "put_bytes", "get_bytes",
            "notifies_received", "ring_waits", "doorbells_rung", "doorbells_received",
            "duplicates_discarded", "protocol_errors", "inbox_peak", "recvs_into_direct",
            "recvs_into_copied", "recvs_into_too_small", "recvs_into_sender_wrote"), 0)

    # ---------------------------------------------------------------- subclass hooks
    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _send(self, peer: str, kind: int, pieces: list[memoryview], total: int, wait_ack: bool) -> None: ...

    @abstractmethod
    async def _put(self, peer: str, window: str, offset: int, data: memoryview, notify: bytes | None) -> None: ...

    @abstractmethod
    async def _get(self, peer: str, window: str, offset: int, nbytes: int) -> bytes | memoryview: ...

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    def window(self, name: str) -> np.ndarray: ...

    def _poll(self) -> None:
        """Re-scan for work without a wake-up (safety net against a lost doorbell)."""

    def _on_inbox_space(self) -> None:
        """The application consumed from a full inbox: resume copying out of the rings."""

    def _on_post(self, post: PostedRecv) -> None:
        """A receive was posted and nothing of its peer waits in the inbox: a message of that
        peer already being gathered into a fresh buffer may move into it (``adopt``)."""

    def _withdraw(self, post: PostedRecv) -> bool:
        """Stop offering ``post``'s buffer to its peer; True when the peer already took it (it
        is writing a message into it). Transports without direct writes: always False."""
        return False

    def _taken(self, post: PostedRecv) -> bool:
        """Does the peer (still) claim ``post``'s withdrawn buffer?"""
        return False

    def _writer_error(self, post: PostedRecv) -> XcclError | None:
        """A message is being gathered into ``post``'s buffer: is its writer gone? (None: no)"""
        return None

    # ---------------------------------------------------------------- posted receives (used by subclasses)
    def _take_post(self, src: str, total: int, holder: Any, tag: Any = None) -> np.ndarray | None:
        """A ``Reassembler`` claim: the posted buffer of ``src`` for a message of ``total`` bytes
        starting now, or None (no post, or too small: the message goes to a fresh buffer and
        the post fails with BufferTooSmall when it completes)."""
        post = self._posts.get(src)
        if post is None or total > post.buffer.nbytes or post.state == "incoming":
            return None
        if post.state == "filling" and post.holder is not holder:
            return None
        if post.state == "posted" and self._withdraw(post):
            post.state = "incoming"  # cannot happen (a writer only takes it with nothing unacked)
            return None
        # posted, or filling by the same reassembler whose partial message the sender abandoned
        post.state, post.holder, post.holder_tag = "filling", holder, tag
        post.target = post.buffer[:total]
        return post.target

    def _abandon(self, holder: Any, why: XcclError) -> None:
        """``holder`` (a reassembler) is discarded: a post it was filling fails with ``why``."""
        for post in list(self._posts.values()):
            if post.holder is holder and post.state == "filling":
                post._finish(None, why)

    # ---------------------------------------------------------------- inbox (used by subclasses)
    def _inbox_has_room(self, kind: int = KIND_DATA) -> bool:
        q = self._inbox if kind == KIND_DATA else self._notes
        return len(q) < self.cfg.inbox_max

    def _deliver(self, src: str, frames: list[memoryview], nbytes: int, into: bool = False,
                 how: str = "direct") -> None:
        post = self._posts.get(src)
        if into:  # gathered straight into the posted buffer ("direct"), or written there by src
            assert post is not None and post.state == "filling"
            self.stats["bytes_received"] += nbytes
            self.stats[f"recvs_into_{how}"] += 1
            post._finish(Received(src, frames, nbytes), None)
            return
        if post is not None and post.state == "posted" and self._fill(post, src, frames):
            self.stats["bytes_received"] += nbytes
            return
        self._inbox.append((src, frames, None))
        self.stats["bytes_received"] += nbytes
        self.stats["inbox_peak"] = max(self.stats["inbox_peak"], len(self._inbox))
        self._wake(self._recv_waiters)

    def _deliver_error(self, src: str, exc: XcclError) -> None:
        # Errors bypass the bound: there is at most one per violating chunk already consumed.
        exc.peer = src  # type: ignore[attr-defined]
        self.stats["protocol_errors"] += 1
        post = self._posts.get(src)
        if post is not None:  # the error is about the message the post waits for
            post._finish(None, exc)
            return
        self._inbox.append((src, None, exc))
        self._wake(self._recv_waiters)

    def _deliver_notify(self, note: Notification) -> None:
        self._notes.append(note)
        self.stats["notifies_received"] += 1
        self._wake(self._note_waiters)

    @staticmethod
    def _wake(waiters: list[asyncio.Future[bool]]) -> None:
        for fut in waiters:
            _resolve(fut, True)
        waiters.clear()

    async def _park(self, waiters: list[asyncio.Future[bool]], timeout_s: float) -> bool:
        """Wait until woken (True) or ``timeout_s`` passed (False)."""
        fut: asyncio.Future[bool] = self._loop.create_future()
        waiters.append(fut)
        handle = self._loop.call_later(timeout_s, _resolve, fut, False)
        try:
            return await fut
        finally:
            handle.cancel()
            if not fut.done():
                fut.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise EndpointClosed(f"endpoint {self.name} is closed")

    async def _fabric_delay(self, dst_npu: int, nbytes: int) -> None:
        """Hold the data back until the fabric says it has arrived (never early)."""
        fab = self._fabric
        if fab is None or fab.is_ideal:
            return
        delay_s = await fab.reserve(dst_npu, nbytes)
        if delay_s > 0:
            await fab.wait_until(time.monotonic() + delay_s)

    # ---------------------------------------------------------------- public API
    async def probe_path(self, dst_npu: int, *, timeout_s: float | None = None) -> None:
        """Ask the fabric whether transfers to ``dst_npu`` *and back* would go through now
        (0-byte reservations, no data, no notification): raises ``LinkDown`` when either way
        is refused. Both ways, because a peer that answers needs the way back: a one-way
        fault (its transmit port down) otherwise only shows as answers that never come."""
        self._check_open()
        fab = self._fabric
        if fab is None or fab.is_ideal:
            return
        await fab.reserve(dst_npu, 0, timeout_s=timeout_s)
        await fab.reserve(fab.npu, 0, timeout_s=timeout_s, src_npu=dst_npu)

    async def send(self, peer: str, frames: Sequence[Any], *, timeout_s: float = 5.0) -> None:
        self._check_open()
        views = as_byte_views(frames)
        prefix = memoryview(frame_prefix(views))
        pieces = [prefix, *views]
        total = sum(v.nbytes for v in pieces)
        if total > self.cfg.max_message_bytes:
            raise WindowError(f"message of {total} B exceeds max_message_bytes={self.cfg.max_message_bytes}")
        await self._timed(self._send(peer, KIND_DATA, pieces, total, True), timeout_s, f"send to {peer}")
        self.stats["sends"] += 1
        self.stats["bytes_sent"] += total

    async def recv(self, peer: str | None = None, *, timeout_s: float = 5.0) -> tuple[str, list[memoryview]]:
        self._check_open()
        deadline = self._loop.time() + timeout_s
        while True:
            for i, (src, frames, err) in enumerate(self._inbox):
                if peer is None or src == peer:
                    was_full = len(self._inbox) >= self.cfg.inbox_max
                    del self._inbox[i]
                    if was_full:
                        self._on_inbox_space()
                    if err is not None:
                        raise err
                    self.stats["recvs"] += 1
                    assert frames is not None
                    return src, frames
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise XcclTimeout(f"{self.name}: nothing received from {peer or 'any peer'} in {timeout_s} s")
            woken = await self._park(self._recv_waiters, min(remaining, self._idle_poll_s))
            self._check_open()
            if not woken:
                self._poll()

    def _direct_post(self, src: str, seq: int) -> tuple[PostedRecv, bool] | None:
        """The post ``src`` wrote a message into (published as ``seq``), and whether it was
        released meanwhile (then the message is copied out to the inbox)."""
        post = self._posts.get(src)
        if post is not None and seq and post.direct_seq == seq and post.state in ("posted", "incoming"):
            return post, False
        post = self._draining.get(seq) if seq else None
        if post is not None and post.peer == src:
            del self._draining[seq]
            return post, True
        return None

    def _fill(self, post: PostedRecv, src: str, frames: list[memoryview]) -> bool:
        """Copy a message received in a fresh buffer into ``post`` (once); False when it does
        not fit: the post fails with BufferTooSmall and the message stays for the next recv."""
        try:
            views, used = pack_into(post.buffer, frames)
        except BufferTooSmall as exc:
            self.stats["recvs_into_too_small"] += 1
            post._finish(None, BufferTooSmall(exc.needed, exc.have, src))
            return False
        self.stats["recvs_into_copied"] += 1
        post._finish(Received(src, views, used), None)
        return True

    def post_recv(self, peer: str, buffer: Any) -> PostedRecv:
        """Post ``buffer`` (writable, C-contiguous) for the next message from ``peer``; collect
        it with ``await posted.wait(timeout_s=...)``. Posting before the peer sends is what
        makes the receive direct (ring -> buffer). One post per peer at a time."""
        self._check_open()
        mv = memoryview(buffer)
        if mv.readonly or not mv.c_contiguous:
            raise WindowError("recv_into needs a writable C-contiguous buffer")
        arr = np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=np.uint8)
        if peer in self._posts:
            raise WindowError(f"{self.name}: a receive from {peer} is already posted")
        for seq, old in list(self._draining.items()):
            if old.peer == peer and not self._taken(old):  # the writer's claim was taken back
                del self._draining[seq]
        post = PostedRecv(self, peer, arr)
        for i, (src, frames, err) in enumerate(self._inbox):
            if src != peer:
                continue
            # P's oldest waiting message is the next one: copy it now (once) or leave it.
            if err is not None or self._fill_ok(post, src, frames):  # type: ignore[arg-type]
                was_full = len(self._inbox) >= self.cfg.inbox_max
                del self._inbox[i]
                if was_full:
                    self._on_inbox_space()
                if err is not None:
                    post._finish(None, err)
            return post
        self._posts[peer] = post
        self._on_post(post)
        return post

    def _fill_ok(self, post: PostedRecv, src: str, frames: list[memoryview]) -> bool:
        self._posts[src] = post  # _finish unregisters it
        return self._fill(post, src, frames)

    async def recv_into(self, peer: str, buffer: Any, *, timeout_s: float = 5.0) -> Received:
        """Receive the next message from ``peer`` into ``buffer`` (see ``PostedRecv``):
        ``BufferTooSmall`` names both sizes and keeps the message for the next recv;
        ``XcclTimeout`` releases the buffer (a later message is never written into it)."""
        post = self.post_recv(peer, buffer)
        msg = await post.wait(timeout_s=timeout_s)
        self.stats["recvs"] += 1
        return msg

    async def recv_notify(self, *, timeout_s: float = 5.0) -> Notification:
        self._check_open()
        deadline = self._loop.time() + timeout_s
        while not self._notes:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise XcclTimeout(f"{self.name}: no notification in {timeout_s} s")
            woken = await self._park(self._note_waiters, min(remaining, self._idle_poll_s))
            self._check_open()
            if not woken:
                self._poll()
        note = self.poll_notify()
        assert note is not None
        return note

    def poll_notify(self) -> Notification | None:
        """The next notification if one is already here, else None: never waits (what a
        consumer takes along with the one it waited for). Here includes written into our ring
        with its doorbell not handled yet (shm: the rings are scanned first)."""
        self._check_open()
        if not self._notes:
            self._poll()
        if not self._notes:
            return None
        was_full = len(self._notes) >= self.cfg.inbox_max
        note = self._notes.popleft()
        if was_full:
            self._on_inbox_space()
        return note

    async def put(self, peer: str, window: str, offset: int, data: Any, *,
                  notify: bytes | None = None, timeout_s: float = 5.0) -> None:
        self._check_open()
        (view,) = as_byte_views([data])
        if offset < 0:
            raise WindowError(f"negative offset {offset}")
        await self._timed(self._put(peer, window, offset, view, notify), timeout_s, f"put to {peer}")
        self.stats["puts"] += 1
        self.stats["put_bytes"] += view.nbytes

    async def put_many(self, puts: Sequence[PutSpec], *, timeout_s: float = 5.0) -> list[XcclError | None]:
        """Puts that leave together (a dispatch: one block per expert rank): each one's outcome,
        in order, is None or the ``XcclError`` that failed it, so a failing peer costs only its
        own put and never holds the others. Each put means what ``put`` means, timing included;
        a transport may do them with fewer wake-ups (shm: no task and no timer per put)."""
        self._check_open()

        async def one(p: PutSpec) -> XcclError | None:
            try:
                await self.put(p.peer, p.window, p.offset, p.data, notify=p.notify, timeout_s=timeout_s)
            except XcclError as exc:
                return exc
            return None

        if len(puts) == 1:
            return [await one(puts[0])]
        return list(await asyncio.gather(*(one(p) for p in puts)))

    async def get(self, peer: str, window: str, offset: int, nbytes: int, *,
                  timeout_s: float = 5.0) -> bytes | memoryview:
        self._check_open()
        if offset < 0 or nbytes < 0:
            raise WindowError(f"negative offset {offset} or size {nbytes}")
        out = await self._timed(self._get(peer, window, offset, nbytes), timeout_s, f"get from {peer}")
        self.stats["gets"] += 1
        self.stats["get_bytes"] += nbytes
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for post in list(self._posts.values()):
            post._finish(None, EndpointClosed(f"endpoint {self.name} is closed"))
        self._wake(self._recv_waiters)
        self._wake(self._note_waiters)
        await self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def _timed(self, coro: Any, timeout_s: float, what: str) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await coro
        except TimeoutError:
            self._check_open()
            raise XcclTimeout(f"{self.name}: {what} timed out after {timeout_s} s") from None

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def window_slice(windows: dict[str, np.ndarray], name: str, offset: int, nbytes: int, owner: str) -> np.ndarray:
    """Bounds-checked view of ``nbytes`` at ``offset`` in window ``name`` (raises WindowError)."""
    win = windows.get(name)
    if win is None:
        raise WindowError(f"{owner} has no window {name!r} (has {sorted(windows)})")
    if offset < 0 or nbytes < 0 or offset + nbytes > win.nbytes:
        raise WindowError(f"window {owner}/{name}: [{offset}, {offset + nbytes}) outside 0..{win.nbytes}")
    return win[offset:offset + nbytes]


async def open_endpoint(cfg: EndpointConfig, fabric: Any = None, hub: Any = None) -> Endpoint:
    """Open, register and return a ready endpoint of ``cfg.kind``."""
    ep: Endpoint
    if cfg.kind == "shm":
        from xccl_net.shm_endpoint import ShmEndpoint
        ep = ShmEndpoint(cfg, fabric)
    elif cfg.kind == "tcp":
        from xccl_net.tcp_endpoint import TcpEndpoint
        ep = TcpEndpoint(cfg, fabric)
    elif cfg.kind == "mem":
        from xccl_net.mem import MemEndpoint, MemoryHub
        if not isinstance(hub, MemoryHub):
            raise ConfigError("EndpointConfig.kind", "kind 'mem' needs hub=MemoryHub()")
        ep = MemEndpoint(cfg, fabric, hub)
    else:
        raise ConfigError("EndpointConfig.kind", f"unknown kind {cfg.kind!r} (shm, tcp, mem)")
    try:
        await ep._open()
    except BaseException:
        ep._closed = True
        await ep._close()
        raise
    ep.ready.set()
    return ep


__all__ = ["Endpoint", "EndpointConfig", "Notification", "PostedRecv", "PutSpec", "Received", "open_endpoint",
           "PeerUnreachable", "window_slice"]
