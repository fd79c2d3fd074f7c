"""The KV pool's message handling: protocol messages in, replies out (pure: no sockets, no asyncio).

``PoolHandler.handle(msg, now)`` maps services/protocol/kvpool.py messages (plus ``Pin``,
below) onto ``KVPoolCore`` and returns the reply; a request it refuses raises ``Refused``
with a ``status.Code``, which the server turns into an RPC error. Peer input is checked here
(owner string, key length, key count) before it reaches the core, so no input can put the
core into a state it does not expect.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.status import Code, Refused
from services.common.wire import message
from services.kvpool.core import KVPoolCore, UnknownBlock
from services.kvpool.layout import KEY_BYTES
from services.protocol.kvpool import Acquire, Commit, Release, Reserve, Slots, Stats, StatsQuery

MAX_KEYS = 1 << 16          # per request: a 64 Ki-block sequence is far beyond any model here
MAX_OWNER_CHARS = 256


@message("kv.Pin")
@dataclass(frozen=True, slots=True)
class Pin:
    """Like Acquire (pin the leading ready blocks, answer Slots) but not a prefix *lookup*: it
    holds blocks for a hand-off (store -> load), so it is not counted in hits/misses."""
    owner: str
    hashes: tuple[bytes, ...]


class PoolHandler:
    def __init__(self, core: KVPoolCore, block_bytes: int) -> None:
        self.core = core
        self.block_bytes = block_bytes
        self.refused = 0

    def handle(self, msg: object, now: float) -> object:
        try:
            return self._handle(msg, now)
        except Refused:
            self.refused += 1
            raise

    def _handle(self, msg: object, now: float) -> object:
        core = self.core
        if isinstance(msg, StatsQuery):
            s = core.stats()
            return Stats(s.capacity, s.ready, s.writing, s.pinned, s.free, s.hits, s.misses, s.evictions)
        if not isinstance(msg, (Acquire, Pin, Reserve, Commit, Release)):
            raise Refused(Code.INVALID_ARGUMENT, f"the KV pool does not handle {type(msg).__name__}")
        _check(msg.owner, msg.hashes)
        if isinstance(msg, Acquire):
            slots = core.acquire(msg.hashes, msg.owner, now)
            return Slots(tuple(msg.hashes[:len(slots)]), tuple(slots), self.block_bytes)
        if isinstance(msg, Pin):
            # The core counts every acquire as a lookup; a hand-off pin is not one.
            hits, misses = core.hits, core.misses
            slots = core.acquire(msg.hashes, msg.owner, now)
            core.hits, core.misses = hits, misses
            return Slots(tuple(msg.hashes[:len(slots)]), tuple(slots), self.block_bytes)
        if isinstance(msg, Reserve):
            pairs = core.reserve(msg.hashes, msg.owner, now)
            return Slots(tuple(h for h, _ in pairs), tuple(s for _, s in pairs), self.block_bytes)
        if isinstance(msg, Commit):
            try:
                core.commit(msg.hashes, msg.owner)
            except UnknownBlock as exc:
                raise Refused(Code.NOT_FOUND, f"commit refused, nothing committed: {exc}") from None
            return None
        if msg.everything:
            if msg.hashes:
                raise Refused(Code.INVALID_ARGUMENT, "Release: give hashes or everything=True, not both")
            core.release_owner(msg.owner)
        else:
            core.release(msg.hashes, msg.owner)
        return None

    def load(self) -> dict[str, float]:
        """Heartbeat load: what routers and prefills may want to know about this node."""
        s = self.core.stats()
        return {"free_blocks": float(s.free), "ready_blocks": float(s.ready), "pinned_blocks": float(s.pinned),
                "writing_blocks": float(s.writing), "hits": float(s.hits), "misses": float(s.misses),
                "evictions": float(s.evictions)}


def _check(owner: str, hashes: tuple[bytes, ...]) -> None:
    if not owner or len(owner) > MAX_OWNER_CHARS:
        raise Refused(Code.INVALID_ARGUMENT, f"owner must be 1..{MAX_OWNER_CHARS} characters, got {len(owner)}")
    if len(hashes) > MAX_KEYS:
        raise Refused(Code.INVALID_ARGUMENT, f"{len(hashes)} block keys in one request (at most {MAX_KEYS})")
    for i, h in enumerate(hashes):
        if len(h) != KEY_BYTES:
            raise Refused(Code.INVALID_ARGUMENT, f"block key {i} is {len(h)} bytes, keys are {KEY_BYTES} bytes")
