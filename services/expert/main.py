"""MoE expert instance: ``python -m services.run --pod FILE --name expert-i``.

Holds the routed experts the pod's placement puts on rank i (as primary or replica) for every
MoE layer and serves A2E events from any attention rank, each source on its own (DP groups
never wait for each other here). Stateless between events: a restart loses nothing but the
events in flight, which their sources time out and retry.

Heartbeat load: ``events_served``, ``rows_served``, ``batched_blocks`` / ``merged_blocks`` (served
along with other waiting blocks / computed together with another source's block of their layer). RPC: ``ExpertStatsQuery`` -> ``ExpertStats``;
``SetStraggler``/``GetStraggler`` (``services.common.admin``): a delay per answered block.
"""

from __future__ import annotations


from services.common import metrics
from services.common.admin import StragglerKnob
from services.common.status import Code, Refused
from services.common.runtime import ServiceRuntime
from services.expert.core import ExpertInstance
from services.expert.geometry import pod_dispatch
from services.expert.protocol import ExpertStats, ExpertStatsQuery
from services.model.cache import ensure_model
from services.model.weights import load_model
from services.pod.spec import PodSpec, service
from xccl_net.dispatch import DispatchWindows, E2AHandler
from xccl_net.errors import EndpointClosed, XcclError, XcclTimeout

# How long one wait for a notice lasts before the loop goes round (it re-checks nothing but
# keeps every await bounded).
IDLE_WAIT_S = 1.0


async def _serve_events(rt: ServiceRuntime, handler: E2AHandler, inst: ExpertInstance) -> None:
    # A source that takes longer than this to accept an answer is treated as gone for that event.
    answer_put_timeout_s = rt.spec.experts.answer_put_timeout_s
    # Every block that waits is served in one go: the blocks of one MoE layer from the DP groups
    # run each expert once (serve_events). A bad notice is logged, counted and answered with a
    # typed refusal when its source is known (it re-dispatches those rows to a replica); an
    # answer to a source that died is logged: nothing else is lost.
    while True:
        try:
            await handler.serve_events(select=inst.select, timeout_s=IDLE_WAIT_S, answer_timeout_s=answer_put_timeout_s)
        except XcclTimeout:
            continue
        except EndpointClosed:
            raise
        except XcclError as exc:
            rt.log.warning("expert.serve_failed", error=type(exc).__name__, detail=str(exc))


async def serve(spec: PodSpec, name: str) -> None:
    me = service(spec, name)
    model_dir = ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir)
    cfg, weights = load_model(model_dir)
    geo = pod_dispatch(spec, cfg)
    hosted = geo.placement.hosted(me.rank)
    inst = ExpertInstance(cfg, weights, hosted)
    metrics.sampled("xds:expert_tokens", "Token rows computed by each hosted routed expert (all MoE layers): "
                    "the load that expert balancing needs.", lambda: {(str(e),): n for e, n in inst.tokens.items()},
                    ("expert",), kind="counter")
    del weights  # keep only the hosted experts alive
    windows = DispatchWindows()
    handler: E2AHandler | None = None

    def load() -> dict[str, float]:
        if handler is None:
            return {}
        return {"events_served": handler.stats["events"], "rows_served": handler.stats["rows_served"],
                "compute_ms": inst.compute_s * 1e3, "rejected_notices": handler.stats["rejected_notices"],
                "refusals_sent": handler.stats["refusals_sent"], "straggler_ms": handler.delay_s * 1e3,
                "delayed_blocks": handler.stats["delayed_blocks"], "batched_blocks": handler.stats["batched_blocks"],
                "merged_blocks": handler.stats["merged_blocks"]}

    async with ServiceRuntime(spec, name, windows={windows.a2e: geo.layout.a2e_window_bytes}, load=load) as rt:
        handler = E2AHandler(rt.endpoint, rank=me.rank, source_peers=geo.sources, placement=geo.placement,
                             layout=geo.layout, windows=windows)

        knob = StragglerKnob(name, "block", lambda s: setattr(handler, "delay_s", s),
                             lambda: handler.stats["delayed_blocks"])

        async def on_rpc(msg: object, _peer: bytes) -> object:
            admin = knob.handle(msg)
            if admin is not None:
                rt.log.info("expert.straggler", delay_ms=admin.delay_ms)
                return admin
            if not isinstance(msg, ExpertStatsQuery):
                raise Refused(Code.INVALID_ARGUMENT, f"{name} does not handle {type(msg).__name__}")
            assert handler is not None
            return ExpertStats(name=name, hosted=tuple(sorted(hosted)), events=handler.stats["events"],
                               rows=handler.stats["rows_served"], rejected=handler.stats["rejected_notices"],
                               sources=geo.sources, events_per_source=tuple(e for e, _ in handler.per_source),
                               rows_per_source=tuple(r for _, r in handler.per_source))

        rt.serve_rpc(on_rpc)
        await rt.mark_ready(rank=me.rank, hosted=sorted(hosted), sources=list(geo.sources))
        await rt.run_until_stopped(_serve_events(rt, handler, inst))
