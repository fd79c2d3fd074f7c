"""Prefill process (``prefill-i``): ``python -m services.run --pod FILE --name prefill-i``.

Per ``Prefill``: longest cached prefix from the KV pool (whole blocks of ``token_ids[:-1]``, so
at least one token is computed: its logits give the next token), the rest computed with the
full model, next token sampled at position ``len(token_ids)``, the KV of every position stored
in the pool under the request id (pinned there for the decode side's ``load``), and
``PrefillDone`` returned.

The numpy work runs on one worker thread, off the event loop, so heartbeats and RPCs keep
flowing; requests that wait meanwhile are computed together in the next forward pass (one
batch; the model is batch-invariant, so the tokens do not depend on it). A KV pool that is
unreachable is a cache miss on fetch and ``UNAVAILABLE`` on store (the router retries).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.common.rpc import INTERNAL, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, RemoteError
from services.common.runtime import ServiceRuntime
from services.kvpool.client import KVPoolClient, KVPoolProtocolError, KVPoolUnavailable
from services.model.cache import ensure_model
from services.model.weights import load_model
from services.pod.spec import PodSpec
from services.prefill.core import InvalidPrefill, Job, PrefillModel, Result, check, take_batch
from services.prefill.messages import PrefillStats, PrefillStatsQuery
from services.protocol.inference import Prefill, PrefillDone


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    max_waiting: int = 64           # requests waiting for the forward pass; beyond: RESOURCE_EXHAUSTED
    batch_max_requests: int = 8
    batch_max_tokens: int = 4096
    pool_timeout_s: float = 5.0
    compute_timeout_s: float = 60.0


@dataclass(slots=True)
class Counters:
    requests: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    invalid: int = 0
    failed: int = 0
    batches: int = 0
    max_batch_seen: int = 0


class PrefillServer:
    def __init__(self, model: PrefillModel, cfg: PrefillConfig) -> None:
        self.model, self.cfg = model, cfg
        self.rt: ServiceRuntime | None = None
        self.pool: KVPoolClient | None = None
        self.n = Counters()
        self.waiting: deque[tuple[Job, asyncio.Future[Result]]] = deque()
        self.have_work = asyncio.Event()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def load(self) -> dict[str, float]:
        return {"running": self.inflight, "queued": len(self.waiting), "requests": self.n.requests,
                "cached_tokens": self.n.cached_tokens, "computed_tokens": self.n.computed_tokens}

    def stats(self) -> PrefillStats:
        n = self.n
        return PrefillStats(n.requests, n.cached_tokens, n.computed_tokens, n.invalid, n.failed, n.batches,
                            n.max_batch_seen, self.inflight)

    async def on_rpc(self, msg: Any, _ident: bytes) -> Any:
        if isinstance(msg, PrefillStatsQuery):
            return self.stats()
        if not isinstance(msg, Prefill):
            raise RemoteError(INVALID_ARGUMENT, f"prefill does not handle {type(msg).__name__}")
        assert self.rt is not None
        if self.rt.draining:
            raise RemoteError(UNAVAILABLE, f"{self.rt.me.name} is shutting down")
        try:
            params = check(self.model.cfg, msg)
        except InvalidPrefill as exc:
            self.n.invalid += 1
            raise RemoteError(INVALID_ARGUMENT, str(exc)) from None
        self.inflight += 1
        self.idle.clear()
        try:
            return await self._prefill(msg, params)
        except RemoteError:
            self.n.failed += 1
            raise
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()

    async def _prefill(self, msg: Prefill, params: Any) -> PrefillDone:
        assert self.rt is not None and self.pool is not None
        rid, tokens = msg.request_id, tuple(msg.token_ids)
        try:
            n_cached, cached = await self.pool.fetch_prefix(tokens[:-1], rid, timeout_s=self.cfg.pool_timeout_s)
        except KVPoolProtocolError as exc:
            # Computing everything is always correct; a pool that answers nonsense is logged loudly.
            self.rt.log.error("prefill.pool_protocol_error", request_id=rid, error=str(exc))
            n_cached, cached = 0, []
        if len(self.waiting) >= self.cfg.max_waiting:
            raise RemoteError(RESOURCE_EXHAUSTED, f"{len(self.waiting)} prefills already wait for the model")
        job = Job(rid, tokens, params, n_cached, cached)
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiting.append((job, fut))
        self.have_work.set()
        try:
            result = await asyncio.wait_for(fut, self.cfg.compute_timeout_s)
        except TimeoutError:
            raise RemoteError(UNAVAILABLE, f"{rid}: forward pass not done within {self.cfg.compute_timeout_s:g} s") \
                from None
        self.n.cached_tokens += n_cached
        self.n.computed_tokens += job.to_compute
        try:
            ref = await self.pool.store(tokens, result.kv, rid, timeout_s=self.cfg.pool_timeout_s)
        except KVPoolUnavailable as exc:
            raise RemoteError(UNAVAILABLE, f"{rid}: KV pool cannot take the KV: {exc}") from None
        except KVPoolProtocolError as exc:
            raise RemoteError(INTERNAL, f"{rid}: KV pool: {exc}") from None
        self.n.requests += 1
        self.rt.log.info("prefill.done", request_id=rid, tokens=len(tokens), cached=n_cached,
                         next_token=result.next_token)
        return PrefillDone(rid, result.next_token, ref, n_cached, job.to_compute)

    async def worker(self) -> None:
        """The only caller of the model: batches what waits, runs it on the one compute thread."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="prefill-compute")
        try:
            while True:
                await self.have_work.wait()
                while self.waiting and self.waiting[0][1].done():   # its caller timed out
                    self.waiting.popleft()
                n = take_batch([j for j, _ in self.waiting], self.cfg.batch_max_requests, self.cfg.batch_max_tokens)
                batch = [self.waiting.popleft() for _ in range(n)]
                if not self.waiting:
                    self.have_work.clear()
                if not batch:
                    continue
                self.n.batches += 1
                self.n.max_batch_seen = max(self.n.max_batch_seen, len(batch))
                try:
                    results = await loop.run_in_executor(executor, self.model.run, [j for j, _ in batch])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a model bug: every waiter learns it (as INTERNAL), we go on
                    assert self.rt is not None
                    self.rt.log.exception("prefill.compute_failed", requests=[j.request_id for j, _ in batch])
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(RemoteError(INTERNAL, f"forward pass failed: {exc!r}"))
                    continue
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    async def drain(self) -> None:
        await self.idle.wait()


async def serve(spec: PodSpec, name: str, cfg: PrefillConfig = PrefillConfig()) -> None:
    model_cfg, weights = load_model(ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir))
    server = PrefillServer(PrefillModel(model_cfg, weights), cfg)
    async with ServiceRuntime(spec, name, load=server.load) as rt:
        server.rt = rt
        server.pool = KVPoolClient(spec, rt.endpoint, model_cfg)
        try:
            rt.serve_rpc(server.on_rpc)
            await rt.mark_ready(model=spec.model.preset)
            await rt.run_until_stopped(server.worker(), drain=server.drain)
        finally:
            await server.pool.close()
