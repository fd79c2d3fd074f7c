"""Same-host XCCL endpoint: peers write straight into each other's shared-memory segment.

send: the sender copies the payload into the ring that lives in the RECEIVER's segment
(one memcpy per chunk), publishes the tail, rings the receiver's doorbell; the receiver
checks each slot (p2p_core.Reassembler), copies ring -> a fresh buffer handed to the
application (or, when the application posted a buffer for that peer with ``recv_into`` /
``post_recv``, straight into that buffer: one copy, no allocation), and acknowledges by
writing head / acked event (or a NACK) into the SENDER's segment, then rings the sender.
A posted buffer inside one of the receiver's windows is offered to the sender instead
(``_publish``): the sender writes the message into it and rings only a 16 B record.
put/get are plain memcpys into/out of the peer's window.

Wake-ups are the cost (MEASUREMENTS.md), so doorbells are coalesced: a ringer sets the
owner's bell-pending word and only sends a datagram if it was clear; rings issued while
handling an event are deferred to the end of the loop iteration, so an ack and the reply
the application sends right after recv() share one wake-up. A timer every ``poll_s``
re-scans as a safety net (lost wake-up, crashed ringer) and checks peer liveness; while no
doorbell arrives the period doubles up to ``IDLE_POLL_MAX_S`` (an idle pod must not wake 20
times a second per endpoint), and the first doorbell brings it back to ``poll_s``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np

from xccl_net.doorbell import Doorbell, Ringer, bell_address, full_fence
from xccl_net.endpoint import Endpoint, EndpointConfig, Notification, PostedRecv, PutSpec, window_slice
from xccl_net.errors import CorruptMetadata, PeerUnreachable, ProtocolError, WindowError, XcclError, XcclTimeout
from xccl_net.layout import (
    H_BELL_PENDING, H_INCARNATION, H_STATE, P_CHUNK, P_CLAIMED, P_EVENT, P_NACK_CODE, P_NACK_EVENT,
    P_OUT_ACKED, P_OUT_HEAD, P_POST_INC, P_POST_LEN, P_POST_OFF, P_POST_SEQ, P_READER_INC, P_TAIL, P_TAKEN,
    P_WRITER_INC, P_WRITER_WAITS, S_CHECK, S_CHUNK, S_EVENT, S_FLAGS, S_KIND, S_NBYTES, S_NCHUNKS, S_TOTAL,
    SLOT_HEADER_BYTES, STATE_CLOSED, STATE_OPEN, Geometry,
    claim_entry, entry_name, slot_check,
)
from xccl_net.p2p_core import (
    FLAG_DIRECT, FLAG_RESET, KIND_DATA, KIND_NOTIFY, NACK_CODES, NACK_ERRORS, ChunkHeader, Delivered,
    Discarded, Reassembler, Violation, as_byte_views, direct_record, gather_into, n_chunks_for, parse_direct,
    split_message,
)
from xccl_net.shm_segment import Segment, create_segment, map_peer, pid_alive, pretouch, segment_path


@dataclass(eq=False)
class _Link:
    """Both directions of one peer pair, seen from this endpoint."""

    name: str
    seg: Segment            # the peer's segment (mapped)
    geo: Geometry           # the peer's geometry (its ring, its windows)
    windows: dict[str, np.ndarray]
    npu: int
    pid: int
    incarnation: int
    bell: bytes
    remote_idx: int         # our entry in the peer's segment (ring we write)
    local_idx: int          # the peer's entry in our segment (ring it writes; our acks)
    tail: int = 0
    next_event: int = 1
    need_reset: bool = False
    taken: int = 0          # last post of the peer we wrote a message straight into
    dead: XcclError | None = None
    waiters: list = field(default_factory=list)
    lock: object = None


@dataclass(eq=False)
class _Inbound:
    name: str
    idx: int               # its peer entry in our segment
    writer_inc: int
    reasm: Reassembler
    head: int = 0
    bad_tail: int = -1


IDLE_POLL_MAX_S = 1.0   # the safety-net period of an endpoint that hears no doorbell


class ShmEndpoint(Endpoint):
    def __init__(self, cfg: EndpointConfig, fabric: object = None) -> None:
        super().__init__(cfg, fabric)
        self._geo = Geometry(cfg.max_peers, cfg.ring_slots, cfg.slot_bytes, tuple(cfg.windows.items()))
        self._incarnation = random.getrandbits(63) | 1
        self._seg: Segment | None = None
        self._bell: Doorbell | None = None
        self._ringer = Ringer()
        self._links: dict[str, _Link] = {}
        self._inbound: dict[int, _Inbound] = {}
        self._windows: dict[str, np.ndarray] = {}
        self._deferred: dict[str, _Link] = {}
        self._flush_scheduled = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._bells_at_tick = 0
        self._claimed_words = [self._geo.entry_word(i, P_CLAIMED) for i in range(cfg.max_peers)]
        self._seg_addr = 0
        self._post_seq = 0

    # ---------------------------------------------------------------- lifecycle
    async def _open(self) -> None:
        # The doorbell first: binding fails if a live process holds the name, before we
        # judge any segment of that name stale.
        self._bell = Doorbell(self.cfg.namespace, self.name, self.cfg.bell_dir)
        self._seg = create_segment(segment_path(self.cfg.namespace, self.name), self._geo,
                                   npu=self.npu, incarnation=self._incarnation)
        probe = np.frombuffer(self._seg.mm, dtype=np.uint8, count=1)
        self._seg_addr = probe.ctypes.data
        del probe
        for wname, (off, size) in self._geo.window_offsets().items():
            if self.cfg.pretouch_windows:
                pretouch(self._seg.mm, off, size, write=True)
            self._windows[wname] = np.frombuffer(self._seg.mm, dtype=np.uint8, count=size, offset=off)
        self._loop.add_reader(self._bell.fileno(), self._on_bell)
        self._tick_handle = self._loop.call_later(self.cfg.poll_s, self._tick)

    async def _close(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._deferred.clear()
        for link in self._links.values():
            self._wake(link.waiters)
        if self._bell is not None:
            self._loop.remove_reader(self._bell.fileno())
            self._bell.close()
        if self._seg is not None:
            self._seg.words[H_STATE] = STATE_CLOSED
            self._windows.clear()
            self._seg.close(unlink=True)
        for link in self._links.values():
            link.windows.clear()
            link.seg.close(unlink=False)
        self._links.clear()
        self._ringer.close()

    def window(self, name: str) -> np.ndarray:
        self._check_open()
        win = self._windows.get(name)
        if win is None:
            raise WindowError(f"{self.name} has no window {name!r} (has {sorted(self._windows)})")
        return win

    # ---------------------------------------------------------------- links
    def _link(self, peer: str) -> _Link:
        link = self._links.get(peer)
        if link is not None:
            w = link.seg.words
            # A peer killed -9 never marks its segment closed, and its restart maps a new file
            # under the same name: only the owner's pid tells that our mapping is the dead one.
            if (link.dead is None and w[H_STATE] == STATE_OPEN and w[H_INCARNATION] == link.incarnation
                    and pid_alive(link.pid)):
                return link
            self._drop_link(link, link.dead or PeerUnreachable(f"{peer} closed or restarted"))
        if peer == self.name:
            raise PeerUnreachable(f"{self.name}: send to self is not supported")
        seg, hdr = map_peer(segment_path(self.cfg.namespace, peer))
        try:
            assert self._seg is not None
            with self._seg.locked():
                local_idx = claim_entry(self._seg.buf, self._seg.words, self._geo, peer)
            with seg.locked():
                remote_idx = claim_entry(seg.buf, seg.words, hdr.geometry, self.name)
            if local_idx is None or remote_idx is None:
                raise PeerUnreachable(f"peer table full ({self.name} <-> {peer}, max_peers)")
            ow, pw, pg = self._seg.words, seg.words, hdr.geometry
            # Acks for the new peer incarnation start from zero.
            for f in (P_OUT_HEAD, P_OUT_ACKED, P_NACK_EVENT, P_NACK_CODE):
                ow[self._geo.entry_word(local_idx, f)] = 0
            ow[self._geo.entry_word(local_idx, P_READER_INC)] = hdr.incarnation
            if pw[pg.entry_word(remote_idx, P_WRITER_INC)] != self._incarnation:
                # (Re)start our ring in the peer: writer-inc 0 marks "resetting" so a reader
                # never pairs the old incarnation with the new tail.
                pw[pg.entry_word(remote_idx, P_WRITER_INC)] = 0
                pw[pg.entry_word(remote_idx, P_TAIL)] = 0
                pretouch(seg.mm, pg.ring_off(remote_idx), pg.ring_bytes, write=True)
                pw[pg.entry_word(remote_idx, P_WRITER_INC)] = self._incarnation
                tail = 0
            else:
                tail = pw[pg.entry_word(remote_idx, P_TAIL)]
        except BaseException:
            seg.close(unlink=False)
            raise
        wins = {n: np.frombuffer(seg.mm, dtype=np.uint8, count=size, offset=off)
                for n, (off, size) in hdr.windows.items()}
        link = _Link(name=peer, seg=seg, geo=pg, windows=wins, npu=hdr.npu, pid=hdr.pid,
                     incarnation=hdr.incarnation, bell=bell_address(self.cfg.namespace, peer, self.cfg.bell_dir),
                     remote_idx=remote_idx, local_idx=local_idx, tail=tail, lock=asyncio.Lock())
        self._links[peer] = link
        return link

    def _drop_link(self, link: _Link, why: XcclError) -> None:
        link.dead = why
        self._wake(link.waiters)
        if self._links.get(link.name) is link:
            del self._links[link.name]
        self._deferred.pop(link.name, None)
        link.windows.clear()
        link.seg.close(unlink=False)

    def _check_link(self, link: _Link) -> None:
        self._check_open()
        if link.dead is not None:
            raise link.dead
        w = link.seg.words
        if w[H_STATE] != STATE_OPEN or w[H_INCARNATION] != link.incarnation or not pid_alive(link.pid):
            err = PeerUnreachable(f"{self.name}: peer {link.name} (pid {link.pid}) closed or died")
            self._drop_link(link, err)
            raise err

    async def _wait_link(self, link: _Link) -> None:
        woken = await self._park(link.waiters, self.cfg.poll_s)
        if not woken:
            self._pump()
        self._check_link(link)

    # ---------------------------------------------------------------- doorbells
    def _ring(self, link: _Link) -> None:
        self._deferred[link.name] = link
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_rings)

    def _flush_rings(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        links, self._deferred = list(self._deferred.values()), {}
        for link in links:
            self._ring_now(link)

    def _ring_now(self, link: _Link) -> None:
        if link.dead is not None:
            return
        w = link.seg.words
        full_fence()
        if w[H_BELL_PENDING]:
            return
        w[H_BELL_PENDING] = 1
        try:
            self._ringer.ring(link.bell)
        except PeerUnreachable as exc:
            self._drop_link(link, exc)
            return
        self.stats["doorbells_rung"] += 1

    def _on_bell(self) -> None:
        assert self._bell is not None and self._seg is not None
        self.stats["doorbells_received"] += self._bell.drain()
        self._seg.words[H_BELL_PENDING] = 0
        full_fence()
        if self._idle_poll_s > self.cfg.poll_s and self._tick_handle is not None:   # idle no more
            self._idle_poll_s = self.cfg.poll_s
            self._tick_handle.cancel()
            self._tick_handle = self._loop.call_later(self._idle_poll_s, self._tick)
        self._pump()

    def _tick(self) -> None:
        if self._closed or self._seg is None:
            return
        self._seg.words[H_BELL_PENDING] = 0
        full_fence()
        self._pump()
        bells = self.stats["doorbells_received"]
        quiet = bells == self._bells_at_tick
        self._bells_at_tick = bells
        self._idle_poll_s = min(self._idle_poll_s * 2, max(IDLE_POLL_MAX_S, self.cfg.poll_s)) if quiet else self.cfg.poll_s
        self._tick_handle = self._loop.call_later(self._idle_poll_s, self._tick)

    def _poll(self) -> None:
        self._pump()

    def _on_inbox_space(self) -> None:
        self._loop.call_soon(self._pump)

    # ---------------------------------------------------------------- receive side
    def _pump(self) -> None:
        if self._closed or self._seg is None:
            return
        w = self._seg.words
        for idx, claimed in enumerate(self._claimed_words):
            if w[claimed]:
                self._consume(idx)
        for link in self._links.values():
            if link.waiters:
                self._wake(link.waiters)

    def _consume(self, idx: int) -> None:
        assert self._seg is not None
        w, buf, geo = self._seg.words, self._seg.buf, self._geo
        inc_word = geo.entry_word(idx, P_WRITER_INC)
        inc = w[inc_word]
        if inc == 0:
            return
        st = self._inbound.get(idx)
        if st is None or st.writer_inc != inc:
            if st is not None:
                self._abandon(st.reasm, PeerUnreachable(
                    f"{self.name}: {st.name} restarted in the middle of a message to a posted buffer"))
            st = self._new_inbound(entry_name(buf, geo, idx), idx, inc)
            self._inbound[idx] = st
            pretouch(self._seg.mm, geo.ring_off(idx), geo.ring_bytes, write=False)
        tail_word = geo.entry_word(idx, P_TAIL)
        nack: tuple[int, int] | None = None
        start = st.head
        # Keep copying while the writer keeps writing (re-read the tail): one wake-up can
        # drain a whole multi-slot transfer while the sender fills the ring in parallel.
        while True:
            tail = w[tail_word]
            if w[inc_word] != inc:
                break  # the writer is restarting this ring right now; its next ring brings us back
            if tail < st.head or tail - st.head > geo.ring_slots:
                if st.bad_tail != tail:
                    st.bad_tail = tail
                    self._deliver_error(st.name, CorruptMetadata(
                        f"{st.name}->{self.name}: tail {tail} impossible with head {st.head} "
                        f"and {geo.ring_slots} slots"))
                break
            if st.head == tail or not (self._inbox_has_room(KIND_DATA) and self._inbox_has_room(KIND_NOTIFY)):
                break
            ring_full = tail - st.head == geo.ring_slots
            while st.head < tail and self._inbox_has_room(KIND_DATA) and self._inbox_has_room(KIND_NOTIFY):
                off = geo.slot_off(idx, st.head)
                base = off // 8
                hw = tuple(w[base:base + S_CHECK])
                if w[base + S_CHECK] != slot_check(hw) or hw[S_NBYTES] > geo.slot_bytes:
                    effects = [Violation(hw[S_EVENT], CorruptMetadata(f"slot {st.head} header check failed"))]
                else:
                    h = ChunkHeader(hw[S_EVENT], hw[S_CHUNK], hw[S_NCHUNKS], hw[S_TOTAL], hw[S_KIND], hw[S_FLAGS])
                    p0 = off + SLOT_HEADER_BYTES
                    effects = st.reasm.on_chunk(h, buf[p0:p0 + hw[S_NBYTES]])
                st.head += 1
                for eff in effects:
                    bad = self._apply(st.name, eff)
                    if bad is not None:
                        nack = bad
                if ring_full:
                    # The writer may be parked waiting for space: free it now, not after the batch.
                    self._acknowledge(st, None, now=True)
                    ring_full = False
        if st.head != start or nack is not None:
            self._acknowledge(st, nack)

    def _new_inbound(self, name: str, idx: int, writer_inc: int) -> _Inbound:
        reasm = Reassembler(self._geo.slot_bytes, self.cfg.max_message_bytes,
                            claim=lambda total: self._take_post(name, total, reasm, writer_inc))
        return _Inbound(name, idx, writer_inc, reasm)

    def _on_post(self, post: PostedRecv) -> None:
        for st in self._inbound.values():
            if st.name == post.peer and st.reasm.adopt():
                return
        self._publish(post)

    def _publish(self, post: PostedRecv) -> None:
        """A buffer inside one of our windows: offer it to the peer, which may then write its
        next message straight into it (one copy end to end, as put) instead of into the ring."""
        assert self._seg is not None
        off = post.buffer.ctypes.data - self._seg_addr
        if not (self._geo.windows_off <= off and off + post.buffer.nbytes <= self._geo.total_bytes):
            return  # private memory: the ring path (one copy on each side)
        try:
            link = self._link(post.peer)
        except PeerUnreachable:
            return  # not there yet: its message will come through the ring
        self._post_seq += 1
        pw, e = link.seg.words, lambda f: link.geo.entry_word(link.remote_idx, f)
        pw[e(P_POST_INC)] = self._incarnation  # a restarted us never inherits an old offer
        pw[e(P_POST_OFF)] = off
        pw[e(P_POST_LEN)] = post.buffer.nbytes
        pw[e(P_POST_SEQ)] = self._post_seq  # commit: the writer reads the offset after this
        post.published, post.direct_seq, post.holder_tag = link, self._post_seq, link.incarnation

    def _withdraw(self, post: PostedRecv) -> bool:
        link = post.published
        if link is None:
            return False
        post.published = None
        if link.dead is not None:
            return False  # a dead writer writes nothing more
        link.seg.words[link.geo.entry_word(link.remote_idx, P_POST_SEQ)] = 0
        full_fence()  # Dekker with the writer's "store P_TAKEN, fence, re-read P_POST_SEQ"
        post.taken_at = self._geo.entry_word(link.local_idx, P_TAKEN)
        return self._taken(post)

    def _taken(self, post: PostedRecv) -> bool:
        return self._seg is not None and bool(self._seg.words[post.taken_at] == post.direct_seq)

    def _writer_error(self, post: PostedRecv) -> XcclError | None:
        """The writer of a message half-gathered into (or being written to) a posted buffer
        died or restarted?"""
        peer, inc = post.peer, post.holder_tag
        link = self._links.get(peer)
        try:
            if link is None:
                link = self._link(peer)
            else:
                self._check_link(link)
        except PeerUnreachable as exc:
            return PeerUnreachable(f"{self.name}: {peer} died in the middle of a message to a posted "
                                   f"buffer ({exc})")
        if link.incarnation != inc:
            return PeerUnreachable(f"{self.name}: {peer} restarted in the middle of a message to a "
                                   "posted buffer")
        return None

    def _apply(self, src: str, eff: object) -> tuple[int, int] | None:
        """Carry out one reassembler effect; returns (event, nack code) for a violation."""
        if isinstance(eff, Delivered):
            try:
                if eff.direct:
                    self._apply_direct(src, eff)
                elif eff.kind == KIND_DATA:
                    self._deliver(src, split_message(eff.data), memoryview(eff.data).nbytes, eff.into)
                else:
                    win, off, nbytes, note = msgpack.unpackb(eff.data)
                    self._deliver_notify(Notification(src, str(win), int(off), int(nbytes), bytes(note)))
            except (CorruptMetadata, ValueError, TypeError, msgpack.UnpackException) as exc:
                err = exc if isinstance(exc, CorruptMetadata) else CorruptMetadata(f"bad notify record: {exc}")
                return self._apply(src, Violation(eff.event_id, err))
            return None
        if isinstance(eff, Violation):
            self._deliver_error(src, eff.error)
            return eff.event_id, NACK_CODES.get(type(eff.error), NACK_CODES[CorruptMetadata])
        if isinstance(eff, Discarded):
            self.stats["duplicates_discarded"] += 1
        return None

    def _apply_direct(self, src: str, eff: Delivered) -> None:
        seq, nbytes = parse_direct(eff.data)
        found = self._direct_post(src, seq)
        if found is None or nbytes > found[0].buffer.nbytes:
            raise CorruptMetadata(f"{src} wrote {nbytes} B directly into post {seq}, "
                                  "which is not one it was offered")
        post, released = found
        view = post.buffer[:nbytes]
        if released:  # the caller took the buffer back while src was writing: a copy, to the inbox
            self._deliver(src, split_message(np.array(view)), nbytes)
            return
        self._withdraw(post)
        post.state = "filling"
        self._deliver(src, split_message(view), nbytes, True, "sender_wrote")

    def _acknowledge(self, st: _Inbound, nack: tuple[int, int] | None, *, now: bool = False) -> None:
        try:
            link = self._link(st.name)
        except PeerUnreachable:
            return  # the writer is gone (or never had a segment): nobody to acknowledge
        pw, pg = link.seg.words, link.geo
        if nack is not None:
            pw[pg.entry_word(link.remote_idx, P_NACK_CODE)] = nack[1]
            pw[pg.entry_word(link.remote_idx, P_NACK_EVENT)] = nack[0]
        pw[pg.entry_word(link.remote_idx, P_OUT_ACKED)] = st.reasm.last_event
        pw[pg.entry_word(link.remote_idx, P_OUT_HEAD)] = st.head
        assert self._seg is not None
        w, waits = self._seg.words, self._geo.entry_word(st.idx, P_WRITER_WAITS)
        full_fence()   # Dekker with _want_ack: our acknowledgement, then its flag
        if nack is None and not w[waits]:
            return     # nobody parked on it: the writer reads head/acked when it needs them
        w[waits] = 0
        if now:
            self._ring_now(link)
        else:
            self._ring(link)

    # ---------------------------------------------------------------- send side
    async def _send(self, peer: str, kind: int, pieces: list[memoryview], total: int, wait_ack: bool,
                    timed: bool = True) -> None:
        link = self._link(peer)
        if timed:
            await self._fabric_delay(link.npu, total)
        assert self._seg is not None
        ow, geo = self._seg.words, link.geo
        head_word = self._geo.entry_word(link.local_idx, P_OUT_HEAD)
        n = n_chunks_for(total, geo.slot_bytes)
        async with link.lock:  # chunks of one message stay contiguous in the ring
            self._check_link(link)
            ev = link.next_event
            link.next_event += 1
            flags = FLAG_RESET if link.need_reset else 0
            link.need_reset = True  # until the last chunk is in: a timeout leaves a partial message
            if kind == KIND_DATA and total > geo.slot_bytes:
                record = self._send_direct(link, ev, pieces, total)
                if record is not None:  # the message is in the peer's buffer: the ring says where
                    pieces, total, n, flags = [memoryview(record)], len(record), 1, flags | FLAG_DIRECT
            for k in range(n):
                while link.tail - ow[head_word] >= geo.ring_slots:
                    self.stats["ring_waits"] += 1
                    self._want_ack(link)
                    if link.tail - ow[head_word] < geo.ring_slots:
                        break
                    self._ring_now(link)
                    await self._wait_link(link)
                self._write_slot(link, ev, k, n, total, kind, flags if k == 0 else 0, pieces)
                if n > 1:
                    self._ring_now(link)  # coalesced: a datagram only if the receiver went to sleep
            link.need_reset = False
        self._ring(link)
        if not wait_ack:
            return
        nack_word = self._geo.entry_word(link.local_idx, P_NACK_EVENT)
        acked_word = self._geo.entry_word(link.local_idx, P_OUT_ACKED)
        while True:
            if ow[nack_word] == ev:
                code = ow[self._geo.entry_word(link.local_idx, P_NACK_CODE)]
                raise NACK_ERRORS.get(code, ProtocolError)(f"{peer} rejected event {ev} (code {code})")
            if ow[acked_word] >= ev:
                return
            self._want_ack(link)
            if ow[nack_word] == ev or ow[acked_word] >= ev:
                continue
            await self._wait_link(link)

    @staticmethod
    def _want_ack(link: _Link) -> None:
        """About to park on ``link``'s acknowledgement: ask its reader to ring us when it writes
        one. Dekker with ``_acknowledge`` (flag, fence; the caller then re-reads head/acked)."""
        link.seg.words[link.geo.entry_word(link.remote_idx, P_WRITER_WAITS)] = 1
        full_fence()

    @staticmethod
    def _write_slot(link: _Link, ev: int, k: int, n: int, total: int, kind: int, flags: int,
                    pieces: list[memoryview]) -> None:
        """Chunk ``k`` of ``n`` of message ``ev`` into the next slot of our ring in the peer
        (the caller made sure it is free), then publish the tail (the commit point)."""
        geo, pw = link.geo, link.seg.words
        off = geo.slot_off(link.remote_idx, link.tail)
        lo = k * geo.slot_bytes
        nb = min(geo.slot_bytes, total - lo)
        p0 = off + SLOT_HEADER_BYTES
        gather_into(link.seg.buf[p0:p0 + nb], pieces, lo)
        hw = (ev, k, n, total, nb, kind, flags)
        base = off // 8
        for i, v in enumerate(hw):
            pw[base + i] = v
        pw[base + S_CHECK] = slot_check(hw)
        pw[geo.entry_word(link.remote_idx, P_EVENT)] = ev
        pw[geo.entry_word(link.remote_idx, P_CHUNK)] = k
        link.tail += 1
        pw[geo.entry_word(link.remote_idx, P_TAIL)] = link.tail  # commit point

    def _send_now(self, link: _Link, kind: int, record: memoryview) -> bool:
        """Send a one-slot message without waiting, when nothing stands in its way: no other
        send of this link in progress and a free slot. False: nothing was written (use ``_send``)."""
        assert self._seg is not None
        if link.lock.locked() or record.nbytes > link.geo.slot_bytes:
            return False
        if link.tail - self._seg.words[self._geo.entry_word(link.local_idx, P_OUT_HEAD)] >= link.geo.ring_slots:
            return False
        ev = link.next_event
        link.next_event += 1
        flags = FLAG_RESET if link.need_reset else 0
        self._write_slot(link, ev, 0, 1, record.nbytes, kind, flags, [record])
        link.need_reset = False
        self._ring(link)
        return True

    def _send_direct(self, link: _Link, ev: int, pieces: list[memoryview], total: int) -> bytes | None:
        """Write message ``ev`` straight into the buffer the peer posted for us, if it offered
        one that fits and every earlier message was consumed (so none of them can still be
        headed for that buffer). Returns the ring record, or None (use the ring)."""
        ow, e = self._seg.words, lambda f: self._geo.entry_word(link.local_idx, f)  # type: ignore[union-attr]
        seq = ow[e(P_POST_SEQ)]
        if (not seq or seq == link.taken or ow[e(P_OUT_ACKED)] != ev - 1 or ow[e(P_POST_LEN)] < total
                or ow[e(P_POST_INC)] != link.incarnation):
            return None
        off = ow[e(P_POST_OFF)]
        if off < link.geo.windows_off or off + total > link.geo.total_bytes:
            return None  # not in the peer's windows: never write there
        link.seg.words[link.geo.entry_word(link.remote_idx, P_TAKEN)] = seq
        link.taken = seq
        full_fence()  # Dekker with the receiver's "clear P_POST_SEQ, fence, read P_TAKEN"
        if ow[e(P_POST_SEQ)] != seq:
            # Withdrawn meanwhile. The receiver may have seen our claim: take it back, so it
            # stops waiting for a write that will not come.
            link.seg.words[link.geo.entry_word(link.remote_idx, P_TAKEN)] = 0
            return None
        gather_into(link.seg.buf[off:off + total], pieces, 0)
        return direct_record(seq, total)

    async def _put(self, peer: str, window: str, offset: int, data: memoryview, notify: bytes | None) -> None:
        link = self._link(peer)
        dst = window_slice(link.windows, window, offset, data.nbytes, peer)
        # One transfer on the fabric: the data and its notification travel together (one
        # reservation for both), as a UB write-with-notify does.
        rec = None if notify is None else memoryview(msgpack.packb([window, offset, data.nbytes, bytes(notify)]))
        await self._fabric_delay(link.npu, data.nbytes + (0 if rec is None else rec.nbytes))
        self._check_link(link)
        memoryview(dst)[:] = data
        if rec is not None:
            await self._send(peer, KIND_NOTIFY, [rec], rec.nbytes, False, timed=False)

    async def put_many(self, puts: Sequence[PutSpec], *, timeout_s: float = 5.0) -> list[XcclError | None]:
        """``Endpoint.put_many`` without a task or a timer per put: each put's fabric delay is
        reserved at once, without I/O (the shared link table), in order; the loop then waits once
        for each arrival time in turn, writes the data and its one-slot notification straight
        into the peer's ring. A put that cannot go this way (the table not mapped, its link busy
        or full) takes the ordinary path, under its own timeout."""
        self._check_open()
        out: list[XcclError | None] = [None] * len(puts)
        fab = self._fabric
        timed = fab is not None and not fab.is_ideal
        start = time.monotonic()
        deadline = start + timeout_s
        going: list[tuple[float, int, _Link, np.ndarray, memoryview, memoryview | None]] = []
        slow: list[int] = []
        for i, p in enumerate(puts):
            try:
                (view,) = as_byte_views([p.data])
                if p.offset < 0:
                    raise WindowError(f"negative offset {p.offset}")
                link = self._link(p.peer)
                dst = window_slice(link.windows, p.window, p.offset, view.nbytes, p.peer)
                rec = None if p.notify is None else memoryview(
                    msgpack.packb([p.window, p.offset, view.nbytes, bytes(p.notify)]))
                at = 0.0   # when the fabric has delivered it (time.monotonic)
                if timed:
                    delay = fab.reserve_now(link.npu, view.nbytes + (0 if rec is None else rec.nbytes))
                    if delay is None:
                        slow.append(i)
                        continue
                    at = time.monotonic() + delay if delay > 0 else 0.0
            except XcclError as exc:
                out[i] = exc
                continue
            if at > deadline:
                out[i] = XcclTimeout(f"{self.name}: put to {p.peer} timed out after {timeout_s} s "
                                     f"(the fabric delivers it {at - start:.3f} s after it was posted)")
                continue
            going.append((at, i, link, dst, view, rec))
        going.sort(key=lambda g: g[:2])
        # Puts that must wait (a ring full or busy, the table not mapped) each run as a task of
        # their own after the direct ones, so one slow peer never holds up the others.
        waiting: list[Any] = []

        async def notify_later(i: int, link: _Link, rec: memoryview, nbytes: int) -> None:
            try:
                await self._timed(self._send(link.name, KIND_NOTIFY, [rec], rec.nbytes, False, timed=False),
                                  max(deadline - time.monotonic(), 1e-3), f"put to {link.name}")
            except XcclError as exc:
                out[i] = exc
                return
            self.stats["puts"] += 1
            self.stats["put_bytes"] += nbytes

        async def put_later(i: int) -> None:
            p = puts[i]
            try:
                await self.put(p.peer, p.window, p.offset, p.data, notify=p.notify,
                               timeout_s=max(deadline - time.monotonic(), 1e-3))
            except XcclError as exc:
                out[i] = exc

        waited = False   # only a wait can have let a peer go since _link checked it
        for at, i, link, dst, view, rec in going:
            try:
                if at:
                    await fab.wait_until(at)
                    waited = True
                if waited:
                    self._check_link(link)
                memoryview(dst)[:] = view
            except XcclError as exc:
                out[i] = exc
                continue
            if rec is not None and not self._send_now(link, KIND_NOTIFY, rec):
                waiting.append(notify_later(i, link, rec, view.nbytes))
                continue
            self.stats["puts"] += 1
            self.stats["put_bytes"] += view.nbytes
        if self._deferred:
            # Ring now, not at the end of this loop iteration: the caller may compute before it
            # next awaits (a dispatch runs the shared expert), and the peers should start meanwhile.
            self._flush_rings()
        waiting += [put_later(i) for i in slow]
        if waiting:
            await asyncio.gather(*waiting)
        return out

    async def _get(self, peer: str, window: str, offset: int, nbytes: int) -> bytes:
        link = self._link(peer)
        src = window_slice(link.windows, window, offset, nbytes, peer)
        await self._fabric_delay(link.npu, nbytes)
        self._check_link(link)
        return src.tobytes()

    @property
    def segment_path(self) -> str:
        return segment_path(self.cfg.namespace, self.name)

    @property
    def pid(self) -> int:
        return os.getpid()
