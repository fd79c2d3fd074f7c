"""How an attention rank gets a newly admitted sequence's KV (the ``Load`` path).

Two copies may exist (``KVRef``): the one staged at the prefill that computed it (``source``)
and the one in the KV pool (under the ref's keys, when the pool took it). The staged copy is
pulled first, one-sided from the prefill's ``kv_stage`` window (DistFlow: prefill -> decode
directly), checked against the ref's digest, and acknowledged with a one-way ``StageRelease``
so the prefill frees it. When that fails (the prefill died, or reclaimed the stage: the
digest differs), the pool copy is loaded. Only when neither is there does the Load fail
(``KVPoolUnavailable``), and the decode group reports it (the request is re-prefilled by its
router). A dead or hung pool therefore costs nothing here while the prefill is alive.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from services.common.logging import get_logger
from services.common.rpc import RpcClient
from services.common.zmqio import SendQueueFull
from services.kvpool.client import KV, KVPoolClient, KVPoolUnavailable
from services.kvpool.layout import KVLayoutError
from services.pod.spec import PodSpec, address, services
from services.protocol.inference import KVRef
from services.protocol.kvpool import StageRelease
from xccl_net.errors import EndpointClosed, XcclError

log = get_logger(component="attention")

STAGE_WINDOW = "kv_stage"     # services/prefill/main.py
STAGE_SHARE = 0.5             # of the Load's budget the staged copy may take before the pool is tried


class StagedKVMismatch(KVPoolUnavailable):
    """The staged bytes are not the ones the ref names (the stage was reclaimed and reused)."""


class KVLoader:
    def __init__(self, spec: PodSpec, endpoint: Any, pool: KVPoolClient, *, timeout_s: float = 5.0) -> None:
        self.spec, self.ep, self.pool, self.timeout_s = spec, endpoint, pool, timeout_s
        self.layout = pool.layout
        self.prefills = {s.name for s in services(spec) if s.role == "prefill"}
        self._rpc: dict[str, RpcClient] = {}
        self.stats = {"staged_loads": 0, "pool_loads": 0, "stage_failures": 0}

    async def close(self) -> None:
        for c in self._rpc.values():
            await c.close()

    async def __call__(self, ref: KVRef, request_id: str) -> KV:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if ref.source:
            try:
                kv = await self._from_stage(ref, request_id, self.timeout_s * STAGE_SHARE)
            except (XcclError, KVPoolUnavailable) as exc:
                if isinstance(exc, EndpointClosed):
                    raise
                self.stats["stage_failures"] += 1
                log.warning("attention.stage_load_failed", request_id=request_id, source=ref.source,
                            error=type(exc).__name__, detail=str(exc))
                if not self.pool.usable():
                    raise KVPoolUnavailable(f"KV of {request_id} is neither at {ref.source} "
                                            f"({type(exc).__name__}: {exc}) nor in the pool (down)") from exc
            else:
                self.stats["staged_loads"] += 1
                return kv
        kv = await self.pool.load(ref, request_id, timeout_s=max(deadline - loop.time(), 0.05))
        self.stats["pool_loads"] += 1
        return kv

    async def _from_stage(self, ref: KVRef, request_id: str, timeout_s: float) -> KV:
        if ref.source not in self.prefills:
            raise KVLayoutError(f"KVRef names {ref.source!r} as its source, which is no prefill of this pod")
        if ref.block_size != self.layout.block_size or ref.num_tokens < 1 or ref.stage_offset < 0:
            raise KVLayoutError(f"staged KVRef of {ref.num_tokens} positions in blocks of {ref.block_size} at "
                                f"offset {ref.stage_offset} does not fit blocks of {self.layout.block_size}")
        nb = self.layout.num_blocks(ref.num_tokens)
        data = await self.ep.get(ref.source, STAGE_WINDOW, ref.stage_offset, nb * self.layout.block_bytes,
                                 timeout_s=timeout_s)
        if hashlib.blake2b(data, digest_size=16).digest() != ref.digest:
            raise StagedKVMismatch(f"{ref.source} no longer holds stage {ref.stage_id} of {request_id} "
                                   f"(digest differs: reclaimed)")
        kv = self.layout.unpack(self.layout.view_blocks(data, nb), ref.num_tokens)
        try:
            self._client(ref.source).send(StageRelease(request_id, ref.stage_id))
        except SendQueueFull as exc:   # its lease frees the stage instead
            log.warning("attention.stage_release_dropped", source=ref.source, error=str(exc))
        return kv

    def _client(self, name: str) -> RpcClient:
        c = self._rpc.get(name)
        if c is None:
            c = self._rpc[name] = RpcClient(address(self.spec, name, "rpc"))
        return c
