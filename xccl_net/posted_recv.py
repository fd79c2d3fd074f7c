"""Receives posted into a caller's buffer (``Endpoint.post_recv`` / ``recv_into``).

The state of one posted receive and its waiting; the endpoint (``xccl_net.endpoint``) routes
messages to it and the transport fills it (shm: ring -> buffer, or the writer straight into a
window buffer; tcp/mem: one copy of the received message).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from xccl_net.errors import XcclError, XcclTimeout
from xccl_net.p2p_core import split_message

if TYPE_CHECKING:
    from xccl_net.endpoint import Endpoint

INCOMING_GRACE_S = 1.0  # how long a timed-out wait still waits for a writer mid-copy


class Received(NamedTuple):
    """What ``recv_into`` returns: ``frames`` are views into the caller's buffer, which holds
    the message as on the wire (frame table, then the frames) in its first ``nbytes`` bytes."""

    src: str
    frames: list[memoryview]
    nbytes: int


class PostedRecv:
    """One receive from ``peer`` into a caller buffer (``Endpoint.post_recv``).

    | state    | event                                                  | next                 |
    |----------|--------------------------------------------------------|----------------------|
    | posted   | P's next message starts and fits: chunks go to buffer  | filling              |
    | posted   | (shm, buffer in a window) P wrote it into the buffer   | done (zero copies here) |
    | posted   | P's message completed in a fresh buffer / in the inbox | done (copied once)   |
    | posted   | that message is larger than the buffer                 | failed BufferTooSmall, message kept for the next recv |
    | filling  | last chunk copied                                      | done (direct)        |
    | posted, filling | protocol error of P, endpoint closed            | failed               |
    | filling  | P died or restarted mid-message (shm)                  | failed PeerUnreachable |
    | posted   | ``wait`` times out, but P is writing into the buffer   | incoming: wait on (``max(timeout_s, 1 s)`` more at most) for P to finish |
    | incoming | P's record arrives / P took its claim back / P died    | done / released (XcclTimeout) / failed PeerUnreachable |
    | not collected | ``wait`` times out / is cancelled, ``cancel()``   | released (1)         |

    (1) a partial message moves to a fresh buffer and continues there; a done one is copied
    back to the front of the inbox.

    After ``wait`` returned or raised, nothing more is written into the buffer. Exception: a
    buffer in a registered window that P already started writing when ``cancel()`` (or a task
    cancellation, or the end of the grace in state incoming) released it receives the rest of
    that one message (a copy's time; windows are remotely writable memory anyway), which then
    goes back to the inbox as a copy.
    """

    def __init__(self, ep: Endpoint, peer: str, buffer: np.ndarray) -> None:
        self.peer = peer
        self.buffer = buffer
        self.state = "posted"
        self.result: Received | None = None
        self.error: XcclError | None = None
        self.holder: Any = None          # reassembler gathering into ``target`` (state filling)
        self.holder_tag: Any = None      # transport detail: which writer incarnation
        self.target: np.ndarray | None = None
        self.published: Any = None       # transport detail: the buffer was offered to P (shm windows)
        self.direct_seq = 0
        self.taken_at = 0
        self._ep = ep
        self._waiters: list[asyncio.Future[bool]] = []
        self._waiting = False
        self._collected = False

    def _finish(self, result: Received | None, error: XcclError | None) -> None:
        if self.state in ("done", "failed", "released"):
            return
        if self._ep._posts.get(self.peer) is self:
            del self._ep._posts[self.peer]
        taken = self._ep._withdraw(self) or self.state == "incoming"
        if taken and error is not None:
            self._ep._draining[self.direct_seq] = self  # P is writing it: a copy goes to the inbox
        if error is not None:
            self._unhold()
        self.result, self.error = result, error
        self.state = "done" if error is None else "failed"
        self._ep._wake(self._waiters)

    def _unhold(self) -> None:
        if self.holder is not None and self.target is not None:
            self.holder.release(self.target)

    def cancel(self) -> None:
        """Take the buffer back now: nothing is written into it afterwards and no message is
        lost (a partial one is finished in a fresh buffer, a delivered one is requeued)."""
        if self._collected or self.state in ("failed", "released"):
            return
        ep = self._ep
        if ep._posts.get(self.peer) is self:
            del ep._posts[self.peer]
        self._unhold()
        if ep._withdraw(self) or self.state == "incoming":
            ep._draining[self.direct_seq] = self  # P is writing it: requeue a copy when it is complete
        if self.state == "done" and self.result is not None:
            copy = np.array(self.buffer[:self.result.nbytes])  # still ours: copy before giving it back
            ep._inbox.appendleft((self.peer, split_message(copy), None))
            ep._wake(ep._recv_waiters)
        self.state = "released"
        ep._wake(self._waiters)

    async def wait(self, *, timeout_s: float = 5.0) -> Received:
        """The message, in the buffer; ``XcclTimeout`` after ``timeout_s`` (buffer released)."""
        if self._waiting or self._collected:
            raise XcclError(f"receive from {self.peer} is already being waited for")
        self._waiting = True
        ep = self._ep
        deadline = ep._loop.time() + timeout_s
        ok = False
        try:
            while self.state in ("posted", "filling", "incoming"):
                remaining = deadline - ep._loop.time()
                if remaining <= 0 and self.state == "posted" and ep._withdraw(self):
                    # P took the buffer and is writing into it right now: it is not ours to give
                    # back before P finishes (or dies).
                    self.state = "incoming"
                    deadline += max(timeout_s, INCOMING_GRACE_S)
                    continue
                if remaining <= 0:
                    raise XcclTimeout(f"{ep.name}: nothing received into the buffer from {self.peer} "
                                      f"in {timeout_s} s")
                if not await ep._park(self._waiters, min(remaining, ep.cfg.poll_s)):
                    ep._check_open()
                    ep._poll()
                    if self.state == "incoming" and not ep._taken(self):
                        self.state = "posted"  # P saw the withdrawal in time and wrote nothing
                    if self.state in ("filling", "incoming"):
                        err = ep._writer_error(self)
                        if err is not None:
                            self._finish(None, err)
            if self.error is not None:
                raise self.error
            if self.state != "done" or self.result is None:
                raise XcclError(f"receive from {self.peer} into the buffer was cancelled")
            ok = self._collected = True
            return self.result
        finally:
            self._waiting = False
            if not ok:
                self.cancel()
