"""Prefill process (``prefill-i``): ``python -m services.run --pod FILE --name prefill-i``.

Per ``Prefill``: longest cached prefix from the KV pool (whole blocks of ``token_ids[:-1]``, so
at least one token is computed: its logits give the next token), the rest computed with the
full model, next token sampled at position ``len(token_ids)``, the KV of every position
*staged* in this process's XCCL window ``kv_stage`` (services/kvpool/staging.py) and named by
the ``KVRef`` of the ``PrefillDone`` returned: the attention rank pulls it from here
one-sided and acknowledges with ``StageRelease``. The KV is also written to the pool (bounded
by ``kv_pool.store_timeout_s``, unpinned) as a prefix cache and a second copy under the ref's
keys.

The KV pool is never a point of failure: a pool that is dead or hung (no answer within
``kv_pool.lookup_timeout_s``) is marked down and skipped by every request (no prefix hits,
the whole prompt computed) until a background probe hears it again.

The numpy work runs on one worker thread, off the event loop, so heartbeats and RPCs keep
flowing; requests that wait meanwhile are computed together in the next forward pass (one
batch; the model is batch-invariant, so the tokens do not depend on it). A KV pool that is
unreachable is a cache miss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.common.config import ConfigError
from services.common.status import Code, Refused
from services.common.runtime import ServiceRuntime
import numpy as np

from services.kvpool.client import KVPoolClient, KVPoolProtocolError
from services.kvpool.layout import BlockLayout, kv_ref
from services.kvpool.staging import StagingArea
from services.model.cache import ensure_model
from services.model.engine import SequenceState
from services.model.layers import warm_tiles
from services.model.weights import load_model
from services.pod.spec import PodSpec
from services.prefill.core import InvalidPrefill, Job, PrefillModel, Result, check, plan_pass
from services.prefill.messages import PrefillStats, PrefillStatsQuery
from services.protocol.inference import Cancel, KVRef, Prefill, PrefillDone
from services.protocol.kvpool import StageRelease

STAGE_WINDOW = "kv_stage"
# GIL switch interval of the prefill process (see serve): 0.5 ms instead of the default 5 ms.
SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    max_waiting: int = 64           # requests waiting for the forward pass; beyond: RESOURCE_EXHAUSTED
    batch_max_requests: int = 8
    batch_max_tokens: int = 512     # positions per pass; a longer prompt is chunked over passes
    compute_timeout_s: float = 60.0


@dataclass(slots=True, eq=False)
class Waiting:
    """A job in the batch queue: its caller's future, and its sequence once a pass began it."""
    job: Job
    fut: asyncio.Future[Result]
    state: SequenceState | None = None

    @property
    def left(self) -> int:
        return len(self.job.tokens) - (self.state.computed if self.state is not None else self.job.n_cached)


@dataclass(slots=True)
class Counters:
    requests: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    invalid: int = 0
    failed: int = 0
    batches: int = 0
    chunked_passes: int = 0     # passes that computed part of a prompt (the rest in a later pass)
    max_batch_seen: int = 0
    pool_skipped: int = 0       # lookups not tried: the pool was down
    cached_in_pool: int = 0     # background cache writes that completed
    cache_skipped: int = 0      # ... that did not (pool down, full, queue full)


class PrefillServer:
    def __init__(self, model: PrefillModel, cfg: PrefillConfig) -> None:
        self.model, self.cfg = model, cfg
        self.rt: ServiceRuntime | None = None
        self.pool: KVPoolClient | None = None
        self.n = Counters()
        self.waiting: deque[Waiting] = deque()
        self.have_work = asyncio.Event()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.staging: StagingArea | None = None
        self.stage_freed = asyncio.Event()
        # request id -> one flag per Prefill of it running here: set when its router cancels it
        self.active: dict[str, list[asyncio.Event]] = {}
        self.cancelled = 0

    def load(self) -> dict[str, float]:
        st = self.staging
        # capacity: what routers may have out here at once (two passes' worth: one computing,
        # one batching); more would only wait in this queue instead of the routers' FCFS ones.
        return {"running": self.inflight, "queued": len(self.waiting), "requests": self.n.requests,
                "capacity": 2 * self.cfg.batch_max_requests, "cancelled": self.cancelled,
                "batches": self.n.batches, "chunked_passes": self.n.chunked_passes,
                "cached_tokens": self.n.cached_tokens, "computed_tokens": self.n.computed_tokens,
                "pool_skipped": self.n.pool_skipped, "pool_down": float(bool(self.pool and self.pool.down_nodes())),
                "cached_in_pool": self.n.cached_in_pool, "cache_skipped": self.n.cache_skipped,
                "staged": len(st) if st else 0, "staged_blocks": st.used_blocks if st else 0,
                "stage_released": st.stats.released if st else 0, "stage_reclaimed": st.stats.reclaimed if st else 0}

    def stats(self) -> PrefillStats:
        n = self.n
        return PrefillStats(n.requests, n.cached_tokens, n.computed_tokens, n.invalid, n.failed, n.batches,
                            n.max_batch_seen, self.inflight, len(self.staging) if self.staging else 0,
                            n.pool_skipped, n.cached_in_pool)

    async def on_rpc(self, msg: Any, _ident: bytes) -> Any:
        if isinstance(msg, PrefillStatsQuery):
            return self.stats()
        if isinstance(msg, StageRelease):   # one-way, from the attention rank that loaded it
            if self.staging is not None and isinstance(msg.stage_id, int) and isinstance(msg.owner, str) \
                    and self.staging.release(msg.stage_id, msg.owner):
                self.stage_freed.set()
            return None
        if isinstance(msg, Cancel):   # one-way, from the router: its client went away or its deadline passed
            if isinstance(msg.request_id, str) and msg.request_id in self.active:
                self._cancel(msg.request_id)
            return None
        if not isinstance(msg, Prefill):
            raise Refused(Code.INVALID_ARGUMENT, f"prefill does not handle {type(msg).__name__}")
        assert self.rt is not None
        if self.rt.draining:
            raise Refused(Code.UNAVAILABLE, f"{self.rt.me.name} is shutting down")
        try:
            params = check(self.model.cfg, msg)
        except InvalidPrefill as exc:
            self.n.invalid += 1
            raise Refused(Code.INVALID_ARGUMENT, str(exc)) from None
        self.inflight += 1
        self.idle.clear()
        flag = asyncio.Event()
        flags = self.active.setdefault(msg.request_id, [])
        flags.append(flag)
        try:
            return await self._prefill(msg, params, flag)
        except Refused:
            self.n.failed += 1
            raise
        finally:
            flags.remove(flag)
            if not flags:
                del self.active[msg.request_id]
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()

    def _cancel(self, rid: str) -> None:
        """Drop ``rid``: out of the batch queue if it waits there; else its result is not
        staged (or its stage released) when the pass ends."""
        for flag in self.active[rid]:
            flag.set()
        self.cancelled += 1
        for w in [w for w in self.waiting if w.job.request_id == rid]:
            self.waiting.remove(w)
            if not w.fut.done():
                w.fut.set_exception(Refused(Code.CANCELLED, f"{rid}: cancelled by its router"))

    def _check_cancelled(self, rid: str, flag: asyncio.Event, stage_id: int | None = None) -> None:
        if flag.is_set():
            if stage_id is not None and self.staging is not None and self.staging.release(stage_id, rid):
                self.stage_freed.set()
            raise Refused(Code.CANCELLED, f"{rid}: cancelled by its router")

    async def _prefill(self, msg: Prefill, params: Any, flag: asyncio.Event) -> PrefillDone:
        assert self.rt is not None and self.pool is not None
        rid, tokens = msg.request_id, tuple(msg.token_ids)
        n_cached, cached = 0, []
        if not self.pool.usable():
            self.n.pool_skipped += 1    # down: no lookup, no timeout; computing everything is exact
        else:
            try:
                n_cached, cached = await self.pool.fetch_prefix(tokens[:-1], rid,
                                                                timeout_s=self.rt.spec.kv_pool.lookup_timeout_s)
            except KVPoolProtocolError as exc:
                # Computing everything is always correct; a pool that answers nonsense is logged loudly.
                self.rt.log.error("prefill.pool_protocol_error", request_id=rid, error=str(exc))
        if len(self.waiting) >= self.cfg.max_waiting:
            raise Refused(Code.RESOURCE_EXHAUSTED, f"{len(self.waiting)} prefills already wait for the model")
        job = Job(rid, tokens, params, n_cached, cached)
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiting.append(Waiting(job, fut))
        self.have_work.set()
        try:
            result = await asyncio.wait_for(fut, self.cfg.compute_timeout_s)
        except TimeoutError:
            raise Refused(Code.UNAVAILABLE, f"{rid}: forward pass not done within {self.cfg.compute_timeout_s:g} s") \
                from None
        self.n.cached_tokens += n_cached
        self.n.computed_tokens += job.to_compute
        self._check_cancelled(rid, flag)
        ref = await self._stage(rid, tokens, result.kv)
        self._check_cancelled(rid, flag, ref.stage_id)
        await self._cache(rid, tokens, result.kv)
        self._check_cancelled(rid, flag, ref.stage_id)
        self.n.requests += 1
        self.rt.log.info("prefill.done", request_id=rid, tokens=len(tokens), cached=n_cached,
                         next_token=result.next_token)
        return PrefillDone(rid, result.next_token, ref, n_cached, job.to_compute)

    async def _stage(self, rid: str, tokens: tuple[int, ...], kv: Any) -> KVRef:
        """Pack the KV into this prefill's staging window; the ref says where (and its digest)."""
        assert self.rt is not None and self.pool is not None and self.staging is not None
        layout: BlockLayout = self.pool.layout
        nb = layout.num_blocks(len(tokens))
        deadline = time.monotonic() + self.cfg.compute_timeout_s
        while (st := self.staging.alloc(rid, nb, time.monotonic())) is None:
            # Every block is held by a live lease: wait for an acknowledgement (or a lease to end).
            left = deadline - time.monotonic()
            if left <= 0:
                raise Refused(Code.RESOURCE_EXHAUSTED, f"{rid}: the KV staging area ({self.staging.capacity} blocks) "
                                                      f"stayed full for {self.cfg.compute_timeout_s:g} s")
            self.stage_freed.clear()
            try:
                await asyncio.wait_for(self.stage_freed.wait(), min(left, self.staging.lease_s))
            except TimeoutError:
                pass
        data = layout.pack(kv, len(tokens)).reshape(-1).view(np.uint8)
        off = st.first_block * layout.block_bytes
        self.rt.endpoint.window(STAGE_WINDOW)[off:off + data.nbytes] = data
        digest = hashlib.blake2b(data, digest_size=16).digest()
        return dataclasses.replace(kv_ref(tokens, rid, layout.block_size), source=self.rt.me.name,
                                   stage_offset=off, stage_id=st.stage_id, digest=digest)

    async def _cache(self, rid: str, tokens: tuple[int, ...], kv: Any) -> None:
        """Write the staged sequence into the pool too (the prefix cache, and a second copy in
        case this prefill dies before the rank loads it), bounded by ``store_timeout_s``; a
        down, hung or full pool only skips it."""
        assert self.pool is not None and self.rt is not None
        if not self.pool.usable():
            self.n.cache_skipped += 1
            return
        try:
            ok = await self.pool.cache(tokens, kv, rid, timeout_s=self.rt.spec.kv_pool.store_timeout_s)
        except KVPoolProtocolError as exc:
            self.rt.log.error("prefill.pool_protocol_error", request_id=rid, error=str(exc))
            ok = False
        if ok:
            self.n.cached_in_pool += 1
        else:
            self.n.cache_skipped += 1

    async def worker(self) -> None:
        """The only caller of the model: batches what waits (``plan_pass``: FCFS, whole prompts
        while they fit, then a chunk of the next) and runs it on the one compute thread."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="prefill-compute")

        def compute(batch: list[tuple[Waiting, int]]) -> list[Result | None]:
            for w, _ in batch:
                if w.state is None:
                    w.state = self.model.start(w.job)
            return self.model.step([(w.job, w.state, n) for w, n in batch])

        try:
            while True:
                await self.have_work.wait()
                while self.waiting and self.waiting[0].fut.done():   # its caller timed out or left
                    self.waiting.popleft()
                if not self.waiting:
                    self.have_work.clear()
                    continue
                plan = plan_pass([w.left for w in self.waiting], self.cfg.batch_max_requests,
                                 self.cfg.batch_max_tokens)
                batch = [(self.waiting[i], n) for i, n in enumerate(plan)]
                self.n.batches += 1
                self.n.max_batch_seen = max(self.n.max_batch_seen, len(batch))
                try:
                    results = await loop.run_in_executor(executor, compute, batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a model bug: every waiter learns it (as INTERNAL), we go on
                    assert self.rt is not None
                    self.rt.log.exception("prefill.compute_failed", requests=[w.job.request_id for w, _ in batch])
                    for w, _ in batch:
                        self._leave(w)
                        if not w.fut.done():
                            w.fut.set_exception(Refused(Code.INTERNAL, f"forward pass failed: {exc!r}"))
                    continue
                for (w, _), res in zip(batch, results):
                    if res is None:
                        self.n.chunked_passes += 1   # stays at the head: its next chunk goes first
                        continue
                    self._leave(w)
                    if not w.fut.done():
                        w.fut.set_result(res)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def _leave(self, w: Waiting) -> None:
        try:
            self.waiting.remove(w)
        except ValueError:
            pass   # cancelled meanwhile

    async def drain(self) -> None:
        await self.idle.wait()


async def serve(spec: PodSpec, name: str, cfg: PrefillConfig | None = None) -> None:
    cfg = cfg or PrefillConfig(batch_max_requests=spec.prefill_batch.max_requests,
                               batch_max_tokens=spec.prefill_batch.max_tokens)
    model_cfg, weights = load_model(ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir))
    warm_tiles(weights)   # probe the GEMM tiles now, not inside the first prompts' TTFT
    server = PrefillServer(PrefillModel(model_cfg, weights), cfg)
    layout = BlockLayout.of(model_cfg, spec.kv_pool.block_size)
    if layout.num_blocks(model_cfg.max_position_embeddings - 1) > spec.kv_pool.staging_blocks:
        raise ConfigError("PodSpec.kv_pool.staging_blocks",
                          f"must hold the longest prompt ({model_cfg.max_position_embeddings - 1} positions = "
                          f"{layout.num_blocks(model_cfg.max_position_embeddings - 1)} blocks)")
    server.staging = StagingArea(spec.kv_pool.staging_blocks, lease_s=spec.kv_pool.staging_lease_s)
    # The compute thread holds the GIL between BLAS calls; the event loop (staging, RPCs,
    # answers) needs it for short moments. With the default 5 ms switch interval every
    # GIL-releasing call of the loop (a send, a hash, a copy) waits up to 5 ms for it back.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    async with ServiceRuntime(spec, name, load=server.load,
                              windows={STAGE_WINDOW: spec.kv_pool.staging_blocks * layout.block_bytes}) as rt:
        server.rt = rt
        server.pool = KVPoolClient(spec, rt.endpoint, model_cfg)
        try:
            rt.serve_rpc(server.on_rpc)
            await rt.mark_ready(model=spec.model.preset, staging_blocks=spec.kv_pool.staging_blocks)
            await rt.run_until_stopped(server.worker(), server.pool.watch(),
                                       drain=server.drain)
        finally:
            await server.pool.close()
