"""In-memory XCCL double (one process) with deterministic fault hooks per peer pair.

``MemoryHub`` is the "network": it delivers messages between ``MemEndpoint``s with
``loop.call_soon`` (so delivery is asynchronous, like a real link) and, per directed pair,
can drop, delay, duplicate or reorder them, drawing from one seeded ``random.Random``, so a
failing run replays exactly. Payloads are copied at send time (the wire owns its bytes).
What the protocol does under each fault is in ``xccl_net.msg_endpoint``/``p2p_core``:
duplicates are discarded by event id, reordering is detected (ChunkOrderError or
EventIdMismatch to both sides), a drop makes the sender's operation time out (XcclTimeout).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from xccl_net.doorbell import NameInUse
from xccl_net.endpoint import EndpointConfig
from xccl_net.errors import PeerUnreachable
from xccl_net.msg_endpoint import MsgEndpoint
from xccl_net.p2p_wire import Chunk, Message, PutReq, Reply


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault probabilities for one directed pair (src -> dst), each in [0, 1]."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0      # hold a message back and deliver it after the next one
    delay_s: float = 0.0
    only: tuple[type, ...] = ()  # restrict to these message classes (empty: all)


def _owned_copy(msg: Message) -> Message:
    if isinstance(msg, Chunk):
        return dataclasses.replace(msg, payload=np.array(msg.payload, dtype=np.uint8, copy=True))
    if isinstance(msg, PutReq):
        return dataclasses.replace(msg, data=np.array(msg.data, dtype=np.uint8, copy=True))
    if isinstance(msg, Reply) and msg.data.nbytes:
        return dataclasses.replace(msg, data=np.array(msg.data, dtype=np.uint8, copy=True))
    return msg


class MemoryHub:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self._eps: dict[str, MemEndpoint] = {}
        self._faults: dict[tuple[str, str], Faults] = {}
        self._held: dict[tuple[str, str], list[Message]] = {}
        self.stats: dict[str, int] = dict.fromkeys(("delivered", "dropped", "duplicated", "reordered"), 0)

    def set_faults(self, src: str, dst: str, faults: Faults | None) -> None:
        if faults is None:
            self._faults.pop((src, dst), None)
        else:
            self._faults[(src, dst)] = faults

    def register(self, ep: MemEndpoint) -> None:
        if ep.name in self._eps:
            raise NameInUse(f"endpoint {ep.name} already registered on this hub")
        self._eps[ep.name] = ep

    def unregister(self, ep: MemEndpoint) -> None:
        if self._eps.get(ep.name) is ep:
            del self._eps[ep.name]
        why = PeerUnreachable(f"{ep.name} closed")
        for other in self._eps.values():
            other._peer_lost(ep.name, why)

    def deliver(self, src: str, dst: str, msg: Message) -> None:
        ep = self._eps.get(dst)
        if ep is None:
            raise PeerUnreachable(f"no endpoint {dst!r} on this hub")
        msg = _owned_copy(msg)
        f = self._faults.get((src, dst))
        if f is None or (f.only and not isinstance(msg, f.only)):
            self._schedule(ep, src, msg, 0.0)
            return
        rng = self.rng
        if rng.random() < f.drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if rng.random() < f.duplicate else 1
        self.stats["duplicated"] += copies - 1
        held = self._held.setdefault((src, dst), [])
        if not held and rng.random() < f.reorder:
            held.extend([msg] * copies)
            self.stats["reordered"] += 1
            return
        batch = [msg] * copies + held
        held.clear()
        for m in batch:
            self._schedule(ep, src, m, f.delay_s)

    def _schedule(self, ep: MemEndpoint, src: str, msg: Message, delay_s: float) -> None:
        self.stats["delivered"] += 1
        loop = asyncio.get_running_loop()
        if delay_s > 0:
            loop.call_later(delay_s, ep._on_message, src, msg, src)
        else:
            loop.call_soon(ep._on_message, src, msg, src)

    def npu_of(self, name: str) -> int:
        ep = self._eps.get(name)
        if ep is None:
            raise PeerUnreachable(f"no endpoint {name!r} on this hub")
        return ep.npu


class MemEndpoint(MsgEndpoint):
    def __init__(self, cfg: EndpointConfig, fabric: Any, hub: MemoryHub) -> None:
        super().__init__(cfg, fabric)
        self._hub = hub

    async def _open(self) -> None:
        self._hub.register(self)

    async def _close(self) -> None:
        await super()._close()
        self._hub.unregister(self)

    def _transmit(self, peer: str, msg: Message) -> None:
        self._hub.deliver(self.name, peer, msg)

    def _respond(self, reply_to: Any, msg: Message) -> None:
        try:
            self._hub.deliver(self.name, reply_to, msg)
        except PeerUnreachable:
            pass  # the requester left; nobody waits for this answer
