"""A minimal asyncio driver for one ZeroMQ socket (about half the cost of ``zmq.asyncio``).

The zmq FD is edge-triggered and only says "zmq's state may have changed": after it fires,
and after every send (a send can consume the edge), ``zmq.EVENTS`` must be read and the
socket drained until it reports nothing more. ``_pump`` does exactly that; sends schedule a
pump with ``call_soon`` (coalesced) so no edge is ever lost.

Incoming messages are handed over in batches (everything readable now, up to
``max_batch``), so a server can answer simultaneous requests with one clock reading.
Outgoing messages that zmq refuses right now (``zmq.Again``: no peer connected with
``IMMEDIATE``, or HWM) wait in a bounded queue until the socket is writable; an entry whose
``wanted()`` turned false meanwhile (its caller timed out) is dropped unsent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

import zmq

Frames = Sequence[bytes | memoryview | zmq.Frame]


class SendQueueFull(RuntimeError):
    """More messages wait for a writable socket than the queue holds."""


class ZmqPump:
    def __init__(self, sock: zmq.Socket, on_batch: Callable[[list[list[bytes]]], None], *,
                 max_batch: int = 256, max_queued: int = 4096) -> None:
        self.sock = sock
        self._on_batch = on_batch
        self._max_batch = max_batch
        self._outq: deque[tuple[Frames, Callable[[], bool] | None]] = deque()
        self._max_queued = max_queued
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._fd = -1
        self.queued_peak = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._pump)
        self._kick()

    def stop(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        self._outq.clear()

    @property
    def queued(self) -> int:
        return len(self._outq)

    def send(self, frames: Frames, wanted: Callable[[], bool] | None = None) -> None:
        """Send now if zmq takes it, else queue (raises ``SendQueueFull`` when full)."""
        if not self._outq:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                self._kick()
                return
            except zmq.Again:
                pass
        if len(self._outq) >= self._max_queued:
            raise SendQueueFull(f"{len(self._outq)} messages already wait for the socket")
        self._outq.append((frames, wanted))
        self.queued_peak = max(self.queued_peak, len(self._outq))
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _flush(self) -> bool:
        """Send queued messages while zmq takes them; True if the queue emptied."""
        while self._outq:
            frames, wanted = self._outq[0]
            if wanted is not None and not wanted():
                self._outq.popleft()
                continue
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            self._outq.popleft()
        return True

    def _pump(self) -> None:
        self._scheduled = False
        if self._fd < 0:
            return
        while self._fd >= 0:  # on_batch may have stopped us
            events = self.sock.getsockopt(zmq.EVENTS)
            progressed = False
            if events & zmq.POLLOUT and self._outq:
                before = len(self._outq)
                self._flush()
                progressed = len(self._outq) != before
            if events & zmq.POLLIN:
                batch: list[list[bytes]] = []
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self.sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                if batch:
                    self._on_batch(batch)
                    progressed = True
            if not progressed:
                return
