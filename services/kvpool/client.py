"""KV pool client used by prefill and attention ranks: metadata over RPC, bytes over XCCL.

Every key (block hash, or a sequence's private tail key) lives on ``HashRing(pool
nodes).node_for(key)``; an operation talks to the nodes its keys map to, concurrently.

Failure policy (the caller decides what a miss costs, never waits forever):
- ``fetch_prefix`` is a cache *lookup*: an unreachable, draining or hung node is a miss for
  its blocks (the prefix ends before the first block it holds) — never an error.
- ``store`` either returns a ``KVRef`` whose every block is committed in the pool **and
  pinned by ``owner``** (so LRU eviction cannot drop a hand-off before decode loads it), or
  raises ``KVPoolUnavailable`` (a node unreachable or full) after dropping everything
  ``owner`` holds in the pool. It never returns a ref to KV the pool does not hold: the
  caller hands the KV over another way or fails the request clearly.
- ``load`` raises ``KVPoolUnavailable`` when a block of the ref is gone (node died, lease
  expired and the block was evicted): the KV must be recomputed (re-prefill).
- A node that timed out or whose data plane failed is *down*: every operation skips it at
  once (a miss, or ``KVPoolUnavailable``) so a dead or hung pool costs one timeout, not one
  per request. With ``watch()`` running, a down node is probed every ``probe_interval_s`` (a
  ``StatsQuery``) and is used again as soon as it answers (restarted, or continued after a
  SIGSTOP); without it, it is retried after ``retry_after_s``.
- A pin asked for (``Acquire``/``Pin``) whose answer did not come in time is released by a
  one-way ``Release`` queued right behind it, so a pool that answers late (continued after a
  SIGSTOP) drops the pin it gives a client that moved on; the late answer itself is ignored.
- ``KVPoolProtocolError``: the pool refused a well-formed request or answered nonsense (a
  bug or a version skew) — not retried, not turned into a miss.

Pins are per ``owner`` and leased (they expire in the pool if the owner dies). Use the
request id as owner on both sides of a hand-off: ``load`` then drops the pins ``store``
took, and ``release(owner)`` drops whatever is left when the request ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from services.common.logging import get_logger
from services.common.rpc import RemoteError, RpcClient, RpcTimeout
from services.common.status import Code, retryable
from services.common.zmqio import SendQueueFull
from services.kvpool.core import HashRing, block_hashes
from services.kvpool.handler import Pin
from services.kvpool.layout import KV, BlockLayout, KVLayoutError, kv_ref, ref_keys, runs
from services.model.config import ModelConfig
from services.pod.spec import PodSpec, address, services
from services.protocol.inference import KVRef
from services.protocol.kvpool import Acquire, Commit, Release, Reserve, Slots, Stats, StatsQuery
from xccl_net.errors import RETRYABLE, EndpointClosed, XcclError, XcclTimeout

log = get_logger()
T = TypeVar("T")

_WAIT_FIRST_S, _WAIT_MAX_S = 0.002, 0.05
# A live node answers metadata in well under this; a timeout with less budget left says
# nothing about the node, so it does not get the node skipped.
_UNRESPONSIVE_S = 0.1


class KVPoolError(Exception):
    """Base of KV pool client errors."""


class KVPoolUnavailable(KVPoolError):
    """The pool cannot serve this now (node unreachable, draining or full; KV evicted)."""


class KVPoolProtocolError(KVPoolError):
    """The pool refused a well-formed request or answered something impossible."""


class KVPoolClient:
    def __init__(self, spec: PodSpec, endpoint: Any, cfg: ModelConfig, *, retry_after_s: float = 1.0,
                 probe_interval_s: float | None = None) -> None:
        self.layout = BlockLayout.of(cfg, spec.kv_pool.block_size)
        self.nodes = [s.name for s in services(spec) if s.role == "kvpool"]
        self.ring = HashRing(self.nodes)
        self.endpoint = endpoint
        self.retry_after_s = retry_after_s
        self._rpc = {n: RpcClient(address(spec, n, "rpc")) for n in self.nodes}
        self._down: dict[str, tuple[float, str]] = {}   # node -> (skip until, why)
        self.probe_interval_s = probe_interval_s if probe_interval_s is not None else spec.kv_pool.probe_interval_s
        self._watching = False
        self._some_down = asyncio.Event()   # set when a node is marked down: the watch wakes only then
        self.marked_down = 0                            # times a node was found dead or hung

    # ------------------------------------------------------------------ liveness
    def usable(self) -> bool:
        """Some node is not known to be down: a lookup or store may be worth trying."""
        now = self._now()
        return any(n not in self._down or self._down[n][0] <= now for n in self.nodes)

    def down_nodes(self) -> list[str]:
        now = self._now()
        return [n for n, (until, _) in self._down.items() if until > now]

    async def watch(self) -> None:
        """Until cancelled: probe the nodes marked down; the first answer brings one back."""
        self._watching = True
        try:
            while True:
                if not self._down:   # nothing to probe: sleep until a node is marked down
                    self._some_down.clear()
                    await self._some_down.wait()
                await asyncio.sleep(self.probe_interval_s)
                down = [n for n in self.nodes if n in self._down]
                if down:
                    await _gather([self._probe(n) for n in down])
        finally:
            self._watching = False

    async def _probe(self, node: str) -> None:
        try:
            reply = await self._rpc[node].call(StatsQuery(), timeout_s=max(self.probe_interval_s, _UNRESPONSIVE_S))
        except (RpcTimeout, RemoteError, SendQueueFull):
            return
        if isinstance(reply, Stats) and self._down.pop(node, None) is not None:
            log.info("kvpool.node_back", node=node)

    async def close(self) -> None:
        for c in self._rpc.values():
            await c.close()

    # ------------------------------------------------------------------ public API
    async def fetch_prefix(self, tokens: Sequence[int], owner: str, *,
                           timeout_s: float = 5.0) -> tuple[int, KV]:
        """Longest cached prefix of ``tokens`` in whole blocks: (positions, per-layer (k, v)).

        To leave at least one token to compute (prefill needs its logits), pass
        ``tokens[:-1]``."""
        deadline = self._deadline(timeout_s)
        hashes = block_hashes(tokens, self.layout.block_size)
        groups = self._group(hashes)

        async def acquire(node: str, idx: list[int]) -> tuple[str, list[int], tuple[int, ...]]:
            asked = tuple(hashes[i] for i in idx)
            try:
                reply = await self._call(node, Acquire(owner, asked), deadline)
            except KVPoolUnavailable as exc:
                log.info("kvpool.miss_unavailable", node=node, error=str(exc))
                return node, idx, ()
            return node, idx, self._leading_slots(node, reply, asked)

        results = await _gather([acquire(n, idx) for n, idx in groups.items()])
        n = len(hashes)
        where: dict[int, tuple[str, int]] = {}
        for node, idx, slots in results:
            if len(slots) < len(idx):
                n = min(n, idx[len(slots)])
            where.update((i, (node, s)) for i, s in zip(idx, slots))
        try:
            if n == 0:
                return 0, self._empty_kv()
            blocks = await self._get_blocks([where[i] for i in range(n)], deadline)
        except KVPoolUnavailable as exc:
            log.info("kvpool.miss_transfer", error=str(exc))
            return 0, self._empty_kv()
        finally:
            self._unpin(owner, {node: [hashes[i] for i in idx[:len(slots)]] for node, idx, slots in results})
        return n * self.layout.block_size, self.layout.unpack(blocks, n * self.layout.block_size)

    async def store(self, tokens: Sequence[int], kv: Sequence[tuple[np.ndarray, np.ndarray]], owner: str, *,
                    timeout_s: float = 5.0, key_owner: str | None = None) -> KVRef:
        """Write the KV of every position of ``tokens``; see the module doc for the guarantee.
        The tail key is made from ``key_owner`` (default ``owner``), the pins are ``owner``'s."""
        deadline = self._deadline(timeout_s)
        ref = kv_ref(tokens, key_owner or owner, self.layout.block_size)
        keys = ref_keys(ref)
        self.layout.check_kv(kv, ref.num_tokens)
        packed: list[np.ndarray] = []

        def blocks() -> np.ndarray:
            # Packed on first need: a store of blocks the pool already holds copies nothing.
            if not packed:
                packed.append(self.layout.pack(kv, ref.num_tokens))
            return packed[0]

        try:
            await _gather([self._store_on(node, [keys[i] for i in idx], idx, blocks, owner, deadline)
                           for node, idx in self._group(keys).items()])
        except KVPoolError:
            self._abandon(owner)
            raise
        return ref

    async def cache(self, tokens: Sequence[int], kv: Sequence[tuple[np.ndarray, np.ndarray]], key_owner: str, *,
                    timeout_s: float = 5.0) -> bool:
        """Best-effort cache write of a sequence staged elsewhere: stored under the keys of
        ``kv_ref(tokens, key_owner)`` (a staged ref's fallback copy), left unpinned (evictable).
        True when every block is in the pool; a down, hung or full pool is just False."""
        owner = f"{key_owner}#cache"
        try:
            await self.store(tokens, kv, owner, timeout_s=timeout_s, key_owner=key_owner)
        except KVPoolUnavailable as exc:
            log.info("kvpool.cache_skipped", owner=key_owner, error=str(exc))
            return False
        self._abandon(owner)   # store pinned them for a hand-off; a cache copy is not one
        return True

    async def load(self, ref: KVRef, owner: str, *, timeout_s: float = 5.0) -> KV:
        """All ``ref.num_tokens`` positions (full blocks + tail); drops ``owner``'s pins on them."""
        if ref.block_size != self.layout.block_size:
            raise KVLayoutError(f"KVRef has blocks of {ref.block_size} positions, the pool {self.layout.block_size}")
        deadline = self._deadline(timeout_s)
        keys = ref_keys(ref)
        groups = self._group(keys)
        pinned: dict[str, list[bytes]] = {}

        async def pin(node: str, idx: list[int]) -> list[tuple[str, int]]:
            asked = tuple(keys[i] for i in idx)
            slots = self._leading_slots(node, await self._call(node, Pin(owner, asked), deadline), asked)
            pinned[node] = list(asked[:len(slots)])
            if len(slots) < len(asked):
                raise KVPoolUnavailable(f"KV of {ref.num_tokens} positions is incomplete: block "
                                        f"{asked[len(slots)].hex()[:12]} is no longer on {node} (evicted or expired)")
            return [(node, s) for s in slots]

        try:
            placed = await _gather([pin(n, idx) for n, idx in groups.items()])
            where: dict[int, tuple[str, int]] = {}
            for (node, idx), locs in zip(groups.items(), placed):
                where.update(zip(idx, locs))
            blocks = await self._get_blocks([where[i] for i in range(len(keys))], deadline)
        finally:
            self._unpin(owner, pinned)
        return self.layout.unpack(blocks, ref.num_tokens)

    async def release(self, owner: str, *, timeout_s: float = 2.0) -> list[str]:
        """Drop every pin and write reservation of ``owner``; returns the nodes not reached
        (their leases expire on their own)."""
        deadline = self._deadline(timeout_s)

        async def one(node: str) -> str | None:
            try:
                await self._call(node, Release(owner, (), True), deadline)
            except KVPoolUnavailable as exc:
                log.info("kvpool.release_unreached", node=node, error=str(exc))
                return node
            return None

        return [n for n in await _gather([one(n) for n in self.nodes]) if n is not None]

    async def stats(self, *, timeout_s: float = 2.0) -> dict[str, Stats]:
        deadline = self._deadline(timeout_s)
        replies = await _gather([self._call(n, StatsQuery(), deadline, Stats) for n in self.nodes])
        return dict(zip(self.nodes, replies))

    # ------------------------------------------------------------------ store, per node
    async def _store_on(self, node: str, keys: list[bytes], idx: list[int], blocks: Callable[[], np.ndarray],
                        owner: str, deadline: float) -> None:
        """Until every key is ready and pinned by ``owner`` on ``node``: pin what is there
        (which also shields it from our own evictions), reserve and write the rest, commit."""
        index = dict(zip(keys, idx))   # key -> block index in the sequence
        wait_s = _WAIT_FIRST_S
        while True:
            asked = tuple(keys)
            n = len(self._leading_slots(node, await self._call(node, Pin(owner, asked), deadline), asked))
            if n == len(keys):
                return
            todo = asked[n:]
            got = await self._call(node, Reserve(owner, todo), deadline)
            if not isinstance(got, Slots) or got.block_bytes != self.layout.block_bytes \
                    or len(got.hashes) != len(got.slots) or not set(got.hashes) <= set(todo) \
                    or len(set(got.hashes)) != len(got.hashes):
                raise KVPoolProtocolError(f"{node}: impossible answer to Reserve: {got!r:.200}")
            if got.hashes:
                await self._put_blocks(node, blocks(), [(index[h], s) for h, s in zip(got.hashes, got.slots)], deadline)
                await self._call(node, Commit(owner, got.hashes), deadline)
                wait_s = _WAIT_FIRST_S
                continue
            # Nothing to write yet not all ready: another writer holds the next block, or no slot is free.
            st = await self._call(node, StatsQuery(), deadline, Stats)
            if st.free == 0 and st.ready <= st.pinned:
                raise KVPoolUnavailable(f"{node} is full: {st.capacity} blocks, {st.pinned} pinned, "
                                        f"{st.writing} being written")
            # No event reaches us when another writer commits: poll, bounded by the deadline.
            if deadline - self._now() <= wait_s:
                raise KVPoolUnavailable(f"{node}: ran out of time waiting for another writer of block "
                                        f"{todo[0].hex()[:12]}")
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, _WAIT_MAX_S)

    # ------------------------------------------------------------------ data plane
    async def _put_blocks(self, node: str, blocks: np.ndarray, pairs: list[tuple[int, int]], deadline: float) -> None:
        bb = self.layout.block_bytes
        for i, slot, count in runs(pairs):
            chunk = blocks[i:i + count]
            await self._xfer(node, deadline, lambda t, c=chunk, s=slot: self.endpoint.put(node, "kv", s * bb, c,
                                                                                       timeout_s=t))

    async def _get_blocks(self, locs: list[tuple[str, int]], deadline: float) -> np.ndarray:
        """Blocks at (node, slot) in order, as one ``[len(locs), *block_shape]`` array."""
        bb = self.layout.block_bytes
        if len({n for n, _ in locs}) == 1 and len(one := runs(enumerate(s for _, s in locs))) == 1:
            # One contiguous run (the common case): the transfer's buffer is the result, no assembly copy.
            node, slot = locs[0][0], one[0][1]
            data = await self._xfer(node, deadline, lambda t: self.endpoint.get(node, "kv", slot * bb, len(locs) * bb,
                                                                                  timeout_s=t))
            if len(data) != len(locs) * bb:
                raise KVPoolProtocolError(f"get from {node} returned {len(data)} bytes, asked {len(locs) * bb}")
            return self.layout.view_blocks(data, len(locs))
        out = np.empty((len(locs), *self.layout.block_shape), dtype=np.float32)
        flat = out.reshape(len(locs), -1).view(np.uint8)
        by_node: dict[str, list[tuple[int, int]]] = {}
        for i, (node, slot) in enumerate(locs):
            by_node.setdefault(node, []).append((i, slot))

        async def fetch(node: str, pairs: list[tuple[int, int]]) -> None:
            for i, slot, count in runs(pairs):
                data = await self._xfer(node, deadline, lambda t, s=slot, c=count: self.endpoint.get(
                    node, "kv", s * bb, c * bb, timeout_s=t))
                if len(data) != count * bb:
                    raise KVPoolProtocolError(f"get from {node} returned {len(data)} bytes, asked {count * bb}")
                flat[i:i + count] = np.frombuffer(data, dtype=np.uint8).reshape(count, bb)

        await _gather([fetch(n, p) for n, p in by_node.items()])
        return out

    async def _xfer(self, node: str, deadline: float, op: Any) -> Any:
        remaining = self._check_node(node, deadline)
        try:
            return await op(remaining)
        except EndpointClosed:
            raise  # our own endpoint: local misuse, not the pool's fault
        except RETRYABLE as exc:
            if not isinstance(exc, XcclTimeout) or remaining >= _UNRESPONSIVE_S:
                self._mark_down(node, f"{type(exc).__name__}: {exc}")
            raise KVPoolUnavailable(f"XCCL transfer with {node} failed: {type(exc).__name__}: {exc}") from exc
        except XcclError as exc:
            raise KVPoolProtocolError(f"XCCL transfer with {node} failed: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ metadata plane
    async def _call(self, node: str, msg: Any, deadline: float, expect: type = Slots) -> Any:
        remaining = self._check_node(node, deadline)
        try:
            reply = await self._rpc[node].call(msg, timeout_s=remaining)
        except RpcTimeout as exc:
            if isinstance(msg, (Acquire, Pin)):
                # Queued behind the request on the same socket: a late pool pins, then unpins.
                self._send(node, Release(msg.owner, msg.hashes))
            if remaining >= _UNRESPONSIVE_S:   # else it is our own budget that ran out, not the node
                self._mark_down(node, str(exc))
            raise KVPoolUnavailable(str(exc)) from exc
        except RemoteError as exc:
            # Draining or overloaded (retryable), or our reservation expired (NOT_FOUND: the blocks
            # are gone, as on a cache miss): this call cannot be served, the pool is not broken.
            if retryable(exc.code) or exc.code is Code.NOT_FOUND:
                raise KVPoolUnavailable(f"{node}: {exc}") from exc
            raise KVPoolProtocolError(f"{node} refused {type(msg).__name__}: {exc}") from exc
        except SendQueueFull as exc:
            raise KVPoolUnavailable(f"{node}: {exc}") from exc
        self._down.pop(node, None)
        if isinstance(msg, (Commit, Release)):
            return reply
        if not isinstance(reply, expect):
            raise KVPoolProtocolError(f"{node} answered {type(msg).__name__} with {type(reply).__name__}")
        return reply

    def _leading_slots(self, node: str, reply: Slots, asked: tuple[bytes, ...]) -> tuple[int, ...]:
        """Validated answer to Acquire/Pin: slots of a leading run of ``asked``."""
        n = len(reply.hashes)
        if reply.block_bytes != self.layout.block_bytes:
            raise KVPoolProtocolError(f"{node} has blocks of {reply.block_bytes} bytes, this model needs "
                                      f"{self.layout.block_bytes} (different model or block_size?)")
        if n > len(asked) or len(reply.slots) != n or tuple(reply.hashes) != asked[:n]:
            raise KVPoolProtocolError(f"{node}: answer does not match the keys asked ({n} of {len(asked)})")
        return tuple(reply.slots)

    def _unpin(self, owner: str, pinned: dict[str, list[bytes]]) -> None:
        """One-way Release: the caller never waits on cleanup; leases back it up."""
        for node, hashes in pinned.items():
            if hashes:
                self._send(node, Release(owner, tuple(hashes)))

    def _abandon(self, owner: str) -> None:
        for node in self.nodes:
            self._send(node, Release(owner, (), True))

    def _send(self, node: str, msg: Any) -> None:
        try:
            self._rpc[node].send(msg)
        except SendQueueFull as exc:
            log.warning("kvpool.release_dropped", node=node, error=str(exc))

    # ------------------------------------------------------------------ helpers
    def _group(self, keys: Sequence[bytes]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(self.ring.node_for(k), []).append(i)
        return groups

    def _empty_kv(self) -> KV:
        shape = (self.layout.num_kv_heads, 0, self.layout.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.layout.num_layers)]

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _deadline(self, timeout_s: float) -> float:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        return self._now() + timeout_s

    def _check_node(self, node: str, deadline: float) -> float:
        now = self._now()
        down = self._down.get(node)
        if down is not None and down[0] > now:
            raise KVPoolUnavailable(f"{node} skipped for {down[0] - now:.2f} s more after: {down[1]}")
        if deadline <= now:
            raise KVPoolUnavailable(f"{node}: operation ran out of time")
        return deadline - now

    def _mark_down(self, node: str, why: str) -> None:
        if self._watching:
            until = float("inf")    # until a probe answers
        elif self.retry_after_s > 0:
            until = self._now() + self.retry_after_s
        else:
            return
        if node not in self._down:
            self.marked_down += 1
            log.warning("kvpool.node_down", node=node, why=why)
        self._down[node] = (until, why)
        self._some_down.set()


async def _gather(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently, all owned by one TaskGroup; the first failure is raised as itself."""
    if len(coros) == 1:
        return [await coros[0]]
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except ExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]
