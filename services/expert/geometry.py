"""The pod's dispatch geometry, derived from the pod spec alone so every attention rank and
every expert instance agrees on it without talking: sources are the attention ranks in
``services(spec)`` order, expert ranks the expert instances in order, placement round robin."""

from __future__ import annotations

from dataclasses import dataclass

from services.model.config import ModelConfig
from services.pod.spec import PodSpec, services
from xccl_net.dispatch_core import DispatchLayout, Placement


@dataclass(frozen=True, slots=True)
class PodDispatch:
    layout: DispatchLayout
    placement: Placement
    sources: tuple[str, ...]     # attention service names; index = dispatch source
    experts: tuple[str, ...]     # expert service names; index = expert rank


def pod_dispatch(spec: PodSpec, cfg: ModelConfig) -> PodDispatch:
    sources = tuple(s.name for s in services(spec) if s.role == "attention")
    experts = tuple(s.name for s in services(spec) if s.role == "expert")
    # A step has at most max_batch tokens; in the worst case all k slots of every token land
    # on one instance, so a block never needs more than max_batch * k rows.
    layout = DispatchLayout(num_sources=len(sources), num_ranks=len(experts),
                            capacity_rows=spec.decode.max_batch * cfg.num_experts_per_tok, hidden=cfg.hidden_size)
    placement = Placement.round_robin(cfg.n_routed_experts, len(experts), spec.experts.replicas)
    return PodDispatch(layout, placement, sources, experts)
