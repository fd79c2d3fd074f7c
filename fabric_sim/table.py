"""The fabric's link state, in memory every process of the pod can map: the *shared link table*.

Why: asking the simulator process when each transfer completes costs a round trip and two
wake-ups per transfer (MEASUREMENTS.md: ~30 µs each on an idle host, milliseconds on a busy
two-core one), several per MoE layer. With the table, a sender computes its own completion
time with the very same model code (``FabricModel`` over these arrays) under a short file
lock, and no process wakes up. The simulator owns the table: it creates it, writes faults and
partitions into it, reads the per-link counters back for telemetry, and serves reservations
over ZeroMQ to clients that cannot map it.

Layout (one file under /dev/shm; all words 8 bytes, little-endian, naturally aligned, so a
single word is written and read whole):

    header   64 words: magic, layout version, state, generation, owner pid, link count,
             NPU count, partition slots, partition seqlock, next partition number, config
             length (the FabricConfig as JSON follows at byte 512)
    links    8 float64 arrays of ``n_links``: free_at, up, added latency (model s),
             bandwidth factor, bytes, transfers, refusals, busy seconds
    slots    ``MAX_PARTITIONS`` x (active, number) words, then a uint8 bitmap
             [slot, side a/b, npu]

Concurrency: a reservation (read free_at, compute, write free_at and counters) runs under
an exclusive ``lockf`` of byte 0, never across an ``await``. A lock that cannot be had within
``LOCK_WAIT_S`` (its holder was stopped with SIGSTOP mid-reservation) is skipped and counted,
and for ``STUCK_S`` afterwards each reservation tries once and goes on: timing may then miss
some contention, the data path never stalls more than once on a stopped holder. Faults are
single-word writes by the simulator; partitions change under a seqlock (odd while writing).

Lifecycle: the simulator creates the file, or takes over the one a killed predecessor left
(same geometry: same file, new generation, faults cleared), and marks it CLOSED and unlinks
it on a clean exit; a client that sees CLOSED drops its mapping and falls back to asking the
simulator (``xccl_net/fabric_client.py``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import mmap
import os
import time
from collections.abc import Iterable

import numpy as np

MAGIC = int.from_bytes(b"XDSFAB01", "little")
LAYOUT_VERSION = 1
STATE_OPEN, STATE_CLOSED = 1, 2
MAX_PARTITIONS = 16
LOCK_WAIT_S = 0.05    # a holder preempted on a busy host releases well within this
STUCK_S = 0.5         # after a wait that failed: this long, try once and go on (a stopped holder)

HEADER_WORDS = 64
CONFIG_OFF = 512
CONFIG_MAX = 4096
LINKS_OFF = CONFIG_OFF + CONFIG_MAX
LINK_FIELDS = ("free_at", "up", "added_lat", "factor", "bytes", "transfers", "refusals", "busy")

(W_MAGIC, W_VERSION, W_STATE, W_GENERATION, W_PID, W_LINKS, W_NPUS, W_SLOTS, W_PSEQ, W_PNEXT,
 W_CONFIG_LEN) = range(11)


class TableError(RuntimeError):
    """The file is not a link table of this layout (or of another topology)."""


def _size(n_links: int, npus: int) -> int:
    return LINKS_OFF + 8 * len(LINK_FIELDS) * n_links + 16 * MAX_PARTITIONS + 2 * MAX_PARTITIONS * npus


class LinkTable:
    """Per-link state arrays (shared when ``path`` is set, private otherwise) + partitions."""

    def __init__(self, n_links: int, npus: int, buf: object | None = None, *, path: str = "",
                 fd: int = -1, mm: mmap.mmap | None = None) -> None:
        self.n_links, self.npus, self.path, self.fd, self._mm = n_links, npus, path, fd, mm
        if buf is None:
            buf = bytearray(_size(n_links, npus))
        self.words = np.frombuffer(buf, dtype=np.uint64, count=HEADER_WORDS)
        self._config = np.frombuffer(buf, dtype=np.uint8, count=CONFIG_MAX, offset=CONFIG_OFF)
        off = LINKS_OFF
        for name in LINK_FIELDS:
            setattr(self, name, np.frombuffer(buf, dtype=np.float64, count=n_links, offset=off))
            off += 8 * n_links
        self.slots = np.frombuffer(buf, dtype=np.uint64, count=2 * MAX_PARTITIONS, offset=off).reshape(MAX_PARTITIONS, 2)
        off += 16 * MAX_PARTITIONS
        self.bitmap = np.frombuffer(buf, dtype=np.uint8, count=2 * MAX_PARTITIONS * npus,
                                    offset=off).reshape(MAX_PARTITIONS, 2, npus)
        self._seen_pseq = -1
        self._stuck_until = 0.0
        self._partitions: list[tuple[str, frozenset[int], frozenset[int]]] = []
        self.lock_timeouts = 0

    # ---- creation / attachment ------------------------------------------------------------
    @classmethod
    def private(cls, n_links: int, npus: int) -> LinkTable:
        t = cls(n_links, npus)
        t._init_header(n_links, npus, generation=1, config=None)
        return t

    @classmethod
    def create(cls, path: str, n_links: int, npus: int, config: object) -> LinkTable:
        """The simulator's table: take over a predecessor's file of the same geometry (its
        clients keep their mapping), else make a new one and rename it into place."""
        size = _size(n_links, npus)
        try:
            old = cls.attach(path)
        except (OSError, TableError):
            old = None
        if old is not None and (old.n_links, old.npus) == (n_links, npus):
            old._take_over(config)
            return old
        if old is not None:
            old.close()
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            t = cls(n_links, npus, mm, path=path, fd=fd, mm=mm)
            t._init_header(n_links, npus, generation=1, config=config)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return t

    @classmethod
    def attach(cls, path: str) -> LinkTable:
        """A client's mapping of the simulator's table (``FileNotFoundError`` if there is none)."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < LINKS_OFF:
                raise TableError(f"{path}: {size} bytes is too small for a link table")
            mm = mmap.mmap(fd, size)
            head = np.frombuffer(mm, dtype=np.uint64, count=HEADER_WORDS)
            if int(head[W_MAGIC]) != MAGIC or int(head[W_VERSION]) != LAYOUT_VERSION:
                del head
                mm.close()
                raise TableError(f"{path} is not a link table of layout {LAYOUT_VERSION}")
            n_links, npus = int(head[W_LINKS]), int(head[W_NPUS])
            del head
            if size != _size(n_links, npus):
                mm.close()
                raise TableError(f"{path}: size {size} does not match {n_links} links, {npus} NPUs")
        except BaseException:
            os.close(fd)
            raise
        return cls(n_links, npus, mm, path=path, fd=fd, mm=mm)

    def _init_header(self, n_links: int, npus: int, *, generation: int, config: object | None) -> None:
        w = self.words
        w[W_STATE] = 0
        w[W_VERSION], w[W_LINKS], w[W_NPUS], w[W_SLOTS] = LAYOUT_VERSION, n_links, npus, MAX_PARTITIONS
        w[W_PNEXT] = 1
        self.free_at[:] = 0.0
        self.up[:] = 1.0
        self.factor[:] = 1.0
        self._write_config(config)
        self._take_over(config, generation=generation)
        w[W_MAGIC] = MAGIC

    def _write_config(self, config: object | None) -> None:
        raw = b"" if config is None else json.dumps(dataclasses.asdict(config)).encode()  # type: ignore[call-overload]
        if len(raw) > CONFIG_MAX:
            raise TableError(f"fabric config of {len(raw)} bytes does not fit the table ({CONFIG_MAX})")
        self._config[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.words[W_CONFIG_LEN] = len(raw)

    def _take_over(self, config: object | None, generation: int | None = None) -> None:
        """A (re)started simulator: no faults, no partitions, a new generation, open."""
        w = self.words
        if config is not None:
            self._write_config(config)
        self.up[:] = 1.0
        self.added_lat[:] = 0.0
        self.factor[:] = 1.0
        self.write_partitions([])
        w[W_GENERATION] = generation if generation is not None else int(w[W_GENERATION]) + 1
        w[W_PID] = os.getpid()
        w[W_STATE] = STATE_OPEN

    def config_json(self) -> dict:
        n = int(self.words[W_CONFIG_LEN])
        return json.loads(bytes(self._config[:n])) if n else {}

    @property
    def is_open(self) -> bool:
        return int(self.words[W_STATE]) == STATE_OPEN

    @property
    def generation(self) -> int:
        return int(self.words[W_GENERATION])

    def close(self, *, unlink: bool = False) -> None:
        """Drop the mapping; the owner marks the table CLOSED and removes the file first."""
        if unlink and self.path:
            self.words[W_STATE] = STATE_CLOSED
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass   # a model still views the arrays: the mapping goes with the last view
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- lock -----------------------------------------------------------------------------
    def lock(self) -> bool:
        """Take the reservation lock, waiting at most ``LOCK_WAIT_S``; False: proceed without."""
        if self.fd < 0:
            return True
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            self._stuck_until = 0.0
            return True
        except OSError:
            pass
        now = time.monotonic()
        if now < self._stuck_until:
            self.lock_timeouts += 1
            return False
        give_up = now + LOCK_WAIT_S
        while time.monotonic() < give_up:
            os.sched_yield()
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
                return True
            except OSError:
                continue
        self.lock_timeouts += 1
        self._stuck_until = time.monotonic() + STUCK_S
        return False

    def unlock(self) -> None:
        if self.fd >= 0:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    # ---- partitions (seqlock: odd while the simulator writes) ------------------------------
    def write_partitions(self, parts: Iterable[tuple[int, frozenset[int], frozenset[int]]]) -> None:
        w = self.words
        parts = list(parts)
        if len(parts) > MAX_PARTITIONS:
            raise ValueError(f"at most {MAX_PARTITIONS} partitions at once")
        w[W_PSEQ] = int(w[W_PSEQ]) | 1
        self.slots[:] = 0
        self.bitmap[:] = 0
        for k, (number, a, b) in enumerate(parts):
            self.bitmap[k, 0, sorted(a)] = 1
            self.bitmap[k, 1, sorted(b)] = 1
            self.slots[k] = (1, number)
        w[W_PSEQ] = int(w[W_PSEQ]) + 1

    def partitions(self) -> list[tuple[str, frozenset[int], frozenset[int]]]:
        """The active partitions (cached until the simulator changes them)."""
        w = self.words
        for _ in range(1000):
            seq = int(w[W_PSEQ])
            if seq == self._seen_pseq:
                return self._partitions
            if seq & 1:
                os.sched_yield()
                continue
            parts = [(f"partition#{int(num)}", frozenset(np.flatnonzero(self.bitmap[k, 0]).tolist()),
                      frozenset(np.flatnonzero(self.bitmap[k, 1]).tolist()))
                     for k, (active, num) in enumerate(self.slots.tolist()) if active]
            if int(w[W_PSEQ]) == seq:
                self._seen_pseq, self._partitions = seq, parts
                return parts
        return self._partitions  # a writer stopped mid-update: keep what we had

    def next_partition_number(self) -> int:
        n = int(self.words[W_PNEXT])
        self.words[W_PNEXT] = n + 1
        return n
