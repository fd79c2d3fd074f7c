"""Doorbells: wake a peer process without busy-polling (unix datagram sockets).

Each shm endpoint binds one datagram socket. By default it lives in the abstract namespace,
``\\0xds-bell.<namespace>.<name>``: no file cleanup, it vanishes when the owner dies (so a ring
of a dead peer fails at once with ECONNREFUSED -> PeerUnreachable), and a second live owner of
the same name fails to bind (EADDRINUSE) -- the liveness test used before touching a segment of
the same name. Abstract sockets are scoped to a network namespace, so processes in different
containers (Docker Compose: one network namespace per service) cannot reach each other's. With
``bell_dir`` set, the socket is a file ``<bell_dir>/<namespace>.<name>.bell`` instead, on a
directory every peer mounts. Same semantics: a ring of a dead owner's file fails with
ECONNREFUSED; a file left by a dead owner is detected (connect refused) and replaced on bind,
while a live owner's makes the bind fail with ``NameInUse``. Probe-unlink-bind and the owner's
unlink at close run under an flock of the directory, so two starters cannot both take a name
and a closing owner never removes its successor's file.

Coalescing lives in the caller: a ringer sets the owner's "bell pending" word and rings only
if it was clear; the owner clears it before scanning, so one wake-up serves many writes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL


def bell_address(namespace: str, name: str, bell_dir: str | None = None) -> bytes:
    if bell_dir is None:
        return f"\0xds-bell.{namespace}.{name}".encode()
    path = os.path.join(bell_dir, f"{namespace}.{name}.bell").encode()
    if len(path) > MAX_SOCKET_PATH:
        raise XcclError(f"doorbell path {path.decode()!r} is {len(path)} bytes; unix sockets allow "
                        f"{MAX_SOCKET_PATH}: use a shorter bell_dir")
    return path


def _owner_alive(address: bytes) -> bool:
    """Does a live process hold the (file) doorbell at ``address``? Connect-probe it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(address)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()


@contextmanager
def _dir_locked(bell_dir: str | None) -> Iterator[None]:
    """Serialise probe/unlink/bind and unlink-on-close of file doorbells in one directory
    (flock on the directory itself: works across processes and containers sharing it)."""
    if bell_dir is None:
        yield
        return
    fd = os.open(bell_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class Doorbell:
    """The owner's receiving side: bind, expose the fd for ``loop.add_reader``, drain."""

    def __init__(self, namespace: str, name: str, bell_dir: str | None = None) -> None:
        self.address = bell_address(namespace, name, bell_dir)
        self._dir = bell_dir
        self._inode = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with _dir_locked(bell_dir):
                try:
                    self._sock.bind(self.address)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or bell_dir is None or _owner_alive(self.address):
                        raise
                    os.unlink(self.address)  # left by a dead owner (kill -9): replace it
                    self._sock.bind(self.address)
                if bell_dir is not None:
                    self._inode = os.stat(self.address).st_ino
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
        if self._dir is not None:
            # Our file only (a successor may already have replaced it), and before our socket
            # closes: once it is closed a starter would judge the file stale and take the name.
            with _dir_locked(self._dir):
                try:
                    if os.stat(self.address).st_ino == self._inode:
                        os.unlink(self.address)
                except FileNotFoundError:
                    pass
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
            shown = address.lstrip(b"\0").decode()
            raise PeerUnreachable(f"doorbell {shown!r} has no owner (peer dead)") from exc

    def close(self) -> None:
        self._sock.close()
