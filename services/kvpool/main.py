"""KV pool service process: ``python -m services.run --pod FILE --name kvpool-i``.

Holds a ``KVPoolCore`` of ``kv_pool.capacity_blocks`` slots and the XCCL window ``kv`` of
``capacity_blocks * block_bytes`` bytes that writers ``put`` into and readers ``get`` from
(slot ``s`` at byte ``s * block_bytes``). Only metadata passes through this process (ZeroMQ
RPC, handled by ``PoolHandler``); block bytes move one-sided between the client and the
window. Leases are expired on a timer so a client that died mid-transfer cannot leak slots.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from services.common import metrics
from services.common.status import Code, Refused
from services.common.runtime import ServiceRuntime
from services.kvpool.core import KVPoolCore
from services.kvpool.handler import Pin, PoolHandler
from services.kvpool.layout import BlockLayout
from services.model.cache import ensure_model
from services.model.config import ModelConfig
from services.pod.spec import PodSpec
from services.protocol.kvpool import Acquire, Reserve

async def _expire_leases(core: KVPoolCore) -> None:
    """Every lease/8: a client that went silent (died, or moved on while this node was
    stopped) loses its pins and write reservations within 1.125 leases."""
    while True:
        await asyncio.sleep(core.lease_s / 8)
        core.expire(time.monotonic())


def _pool_stat(handler: PoolHandler, key: str) -> float:
    s = handler.core.stats()
    if key == "blocks_used":
        return s.capacity - s.free
    return s.capacity if key == "capacity_blocks" else getattr(s, key)


async def serve(spec: PodSpec, name: str) -> None:
    model_dir = ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir)
    layout = BlockLayout.of(ModelConfig.load(model_dir), spec.kv_pool.block_size)
    core = KVPoolCore(spec.kv_pool.capacity_blocks, lease_s=spec.kv_pool.lease_s)
    handler = PoolHandler(core, layout.block_bytes)
    window_bytes = spec.kv_pool.capacity_blocks * layout.block_bytes
    for key, kind, doc in (("hits", "counter", "Prefix lookups' blocks found."),
                           ("misses", "counter", "Prefix lookups' blocks not found."),
                           ("evictions", "counter", "Ready blocks evicted to make room."),
                           ("blocks_used", "gauge", "Blocks ready, pinned or being written."),
                           ("capacity_blocks", "gauge", "Capacity in blocks.")):
        metrics.sampled(f"xds:kvpool_{key}", doc, partial(_pool_stat, handler, key), kind=kind)
    async with ServiceRuntime(spec, name, windows={"kv": window_bytes}, load=handler.load) as rt:

        async def on_rpc(msg: object, _peer: bytes) -> object:
            # Draining: finish what is in flight (commits, releases), take on nothing new.
            if rt.draining and isinstance(msg, (Acquire, Pin, Reserve)):
                raise Refused(Code.UNAVAILABLE, f"{name} is shutting down")
            try:
                return handler.handle(msg, time.monotonic())
            except Refused as exc:
                rt.log.warning("kvpool.refused", code=exc.code, error=exc.message, msg_type=type(msg).__name__)
                raise

        rt.serve_rpc(on_rpc)
        await rt.mark_ready(block_bytes=layout.block_bytes, capacity_blocks=spec.kv_pool.capacity_blocks,
                      block_size=layout.block_size)
        await rt.run_until_stopped(_expire_leases(core))
