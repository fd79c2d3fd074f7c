"""POSIX shared-memory segments under /dev/shm, opened with os.open + mmap.

Not ``multiprocessing.shared_memory``: its resource_tracker unlinks segments it did not
create and warns across processes. Here the owner alone unlinks (``close`` or, as a last
resort, an atexit hook); a stale segment of a dead owner is removed by the next owner.
"""

from __future__ import annotations

import atexit
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from xccl_net.errors import CorruptMetadata, PeerUnreachable, XcclError
from xccl_net.layout import H_PID, STATE_CLOSED, Geometry, Header, read_header, segment_name, write_header

SHM_DIR = "/dev/shm"
_owned: set[str] = set()


class SegmentInUse(XcclError):
    """A segment with this name belongs to a live process: refuse to take it over."""


def segment_path(namespace: str, name: str) -> str:
    return os.path.join(SHM_DIR, segment_name(namespace, name))


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pretouch(mm: mmap.mmap, offset: int, nbytes: int, *, write: bool) -> None:
    """Fault pages in now: a cold page costs ~10x a warm one on first copy."""
    if nbytes <= 0:
        return
    view = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)
    if write:
        view[::mmap.PAGESIZE] = 0
    else:
        int(view[::mmap.PAGESIZE].sum())
    del view


class Segment:
    """One mapped segment (ours or a peer's)."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        self.buf = memoryview(mm)
        self.words = self.buf.cast("Q")
        self.owner = owner

    def header(self) -> Header:
        return read_header(self.buf, self.words)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock over the peer table (claims by several processes)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self, *, unlink: bool) -> None:
        if unlink:
            _unlink(self.path)
        self.words.release()
        self.buf.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # caller still holds window arrays: the mapping goes away with them
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _owned.discard(path)


@atexit.register
def _unlink_owned_at_exit() -> None:
    for path in list(_owned):
        _unlink(path)


def create_segment(path: str, geo: Geometry, *, npu: int, incarnation: int) -> Segment:
    """Create our segment; a leftover of a dead owner is removed, a live owner's is refused."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            _remove_stale(path)
    else:
        raise SegmentInUse(f"{path} reappeared while being replaced")
    try:
        os.ftruncate(fd, geo.total_bytes)
        mm = mmap.mmap(fd, geo.total_bytes)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    _owned.add(path)
    seg = Segment(path, fd, mm, owner=True)
    write_header(seg.buf, seg.words, geo, pid=os.getpid(), npu=npu, incarnation=incarnation)
    return seg


def _remove_stale(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        pid = 0
        if size >= 4096:
            with mmap.mmap(fd, 4096, prot=mmap.PROT_READ) as mm:
                (pid,) = struct.unpack_from("<Q", mm, 8 * H_PID)
    finally:
        os.close(fd)
    if pid_alive(pid):
        raise SegmentInUse(f"{path} belongs to live pid {pid}")
    _unlink(path)


def map_peer(path: str) -> tuple[Segment, Header]:
    """Map a peer's segment; missing, half-initialised or closed -> PeerUnreachable."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise PeerUnreachable(f"no endpoint segment {path}") from None
    try:
        size = os.fstat(fd).st_size
        if size < 4096:
            raise PeerUnreachable(f"{path} is not initialised yet")
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    seg = Segment(path, fd, mm, owner=False)
    try:
        hdr = seg.header()
    except CorruptMetadata as exc:
        seg.close(unlink=False)
        raise PeerUnreachable(f"{path}: {exc}") from exc
    if hdr.state == STATE_CLOSED or not pid_alive(hdr.pid):
        seg.close(unlink=False)
        raise PeerUnreachable(f"{path}: owner pid {hdr.pid} closed or dead")
    return seg, hdr
