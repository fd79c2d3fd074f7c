"""Doorbells: wake a peer process without busy-polling (unix datagram, abstract namespace).

Each shm endpoint binds one datagram socket at ``\\0xds-bell.<namespace>.<name>``. Abstract
addresses need no file cleanup, vanish when the owner dies (so a ring of a dead peer fails at
once with ECONNREFUSED -> PeerUnreachable), and a second live owner of the same name fails to
bind (EADDRINUSE) -- the liveness test used before touching a segment of the same name.
Limit: both sides must share a network namespace (same host, same container netns).

Coalescing lives in the caller: a ringer sets the owner's "bell pending" word and rings only
if it was clear; the owner clears it before scanning, so one wake-up serves many writes.
"""

from __future__ import annotations

import errno
import socket
import threading

from xccl_net.errors import PeerUnreachable, XcclError

_FENCE = threading.Lock()


def full_fence() -> None:
    """Store-load barrier between processes: a lock acquire is a locked instruction (x86 mfence-like).

    Needed by the Dekker-style "write data, then test the pending flag" handshake: without it
    a store may sit in the store buffer while the following load reads a stale flag.
    """
    _FENCE.acquire()
    _FENCE.release()


class NameInUse(XcclError):
    """Another live process owns this endpoint name."""


def bell_address(namespace: str, name: str) -> bytes:
    return f"\0xds-bell.{namespace}.{name}".encode()


class Doorbell:
    """The owner's receiving side: bind, expose the fd for ``loop.add_reader``, drain."""

    def __init__(self, namespace: str, name: str) -> None:
        self.address = bell_address(namespace, name)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(self.address)
        except OSError as exc:
            self._sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise NameInUse(f"endpoint {namespace}/{name} is open in a live process") from exc
            raise
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> int:
        """Read every pending datagram (edge-like use: the caller then scans all state)."""
        n = 0
        while True:
            try:
                self._sock.recv(64)
            except BlockingIOError:
                return n
            n += 1

    def close(self) -> None:
        self._sock.close()


class Ringer:
    """The sending side: one unbound socket rings any address."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def ring(self, address: bytes) -> None:
        try:
            self._sock.sendto(b"\1", address)
        except BlockingIOError:
            pass  # the owner's queue is full of unread rings: it will wake and scan anyway
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise PeerUnreachable(f"doorbell {address[1:].decode()!r} has no owner (peer dead)") from exc

    def close(self) -> None:
        self._sock.close()
