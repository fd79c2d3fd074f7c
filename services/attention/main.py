"""Attention rank: ``python -m services.run --pod FILE --name attention-g-r``.

Holds attention + dense layers, embeddings, final norm, lm_head and the shared experts (no
routed expert: they are dropped at load), and the KV cache of the sequences its decode master
(``decode-g``) gives it, within ``decode.kv_blocks`` blocks per group (split evenly between
the group's attention ranks). See ``services.attention.server`` for the message handling and
``services.attention.core`` for the computation and its exactness argument.
"""

from __future__ import annotations

from services.attention.core import AttentionCore, strip_routed_experts
from services.attention.experts import ExpertWatch
from services.attention.kvcache import KVCache
from services.attention.kvload import KVLoader
from services.attention.server import AttentionServer
from services.common.admin import StragglerKnob
from services.common.status import Code, Refused
from services.common.runtime import ServiceRuntime
from services.expert.geometry import pod_dispatch
from services.kvpool.client import KVPoolClient
from services.model.cache import ensure_model
from services.model.layers import warm_tiles
from services.model.weights import load_model
from services.pod.spec import PodSpec, service
from xccl_net.dispatch import A2EDispatcher, DispatchWindows, Failover
from xccl_net.replica_choice import ReplicaChooser


async def serve(spec: PodSpec, name: str) -> None:
    me = service(spec, name)
    model_dir = ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir)
    cfg, weights = load_model(model_dir)
    geo = pod_dispatch(spec, cfg)
    budget = max(1, spec.decode.kv_blocks // spec.decode.attention_per_group)
    core = AttentionCore(cfg, strip_routed_experts(weights), KVCache(cfg, budget_blocks=budget,
                                                                     block_size=spec.kv_pool.block_size),
                         max_batch=spec.decode.max_batch)
    del weights
    warm_tiles(core.weights)   # probe the GEMM tiles now, not inside the first steps
    windows = DispatchWindows()
    server: AttentionServer | None = None

    loader: KVLoader | None = None

    def load() -> dict[str, float]:
        return {**server.load(), **(loader.stats if loader else {})} if server is not None else {}

    async with ServiceRuntime(spec, name, windows={windows.e2a: geo.layout.e2a_window_bytes}, load=load) as rt:
        npu_of = [service(spec, e).npu for e in geo.experts]

        async def probe(rank: int) -> None:   # LinkDown when the fabric refuses this path now
            await rt.endpoint.probe_path(npu_of[rank], timeout_s=spec.experts.answer_timeout_s)

        dispatcher = A2EDispatcher(rt.endpoint, source=geo.sources.index(name), expert_peers=geo.experts,
                                   placement=geo.placement, layout=geo.layout, windows=windows,
                                   failover=Failover(spec.experts.answer_timeout_s, spec.experts.failover_wait_s),
                                   chooser=(ReplicaChooser(len(geo.experts), prefer=geo.sources.index(name))
                                            if spec.experts.replica_choice else None),
                                   probe=probe)
        watch = ExpertWatch(spec, dispatcher, geo.experts)
        pool = KVPoolClient(spec, rt.endpoint, cfg)
        loader = KVLoader(spec, rt.endpoint, pool)
        try:
            server = AttentionServer(rt.endpoint, core, dispatcher, loader, master=f"decode-{me.group}")
            knob = StragglerKnob(name, "step", lambda s: setattr(server, "delay_s", s), lambda: server.delayed_steps)

            async def on_rpc(msg: object, _peer: bytes) -> object:
                admin = knob.handle(msg)
                if admin is None:
                    raise Refused(Code.INVALID_ARGUMENT, f"{name} does not handle {type(msg).__name__}")
                rt.log.info("attention.straggler", delay_ms=admin.delay_ms)
                return admin

            rt.serve_rpc(on_rpc)
            await rt.mark_ready(group=me.group, source=geo.sources.index(name), kv_blocks=budget)
            await rt.run_until_stopped(server.serve(), pool.watch(), watch.run(),
                                       dispatcher.watch_paths(spec.heartbeat.interval_s))
        finally:
            await loader.close()
            await pool.close()
