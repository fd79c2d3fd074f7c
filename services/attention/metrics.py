"""The attention rank's Prometheus metrics: per MoE layer, how long the A2E dispatch (puts until
every expert rank has its rows) and the E2A wait (from then until every answer is back:
expert compute + transfer + queueing) took, observed once per layer per step (not per row);
and the dispatcher's re-dispatches to replicas, read from its own counters at scrape time."""

from __future__ import annotations

from typing import Any

from services.common import metrics as m


class AttentionMetrics:
    def __init__(self, dispatcher: Any) -> None:
        self._a2e = m.histogram("xds:attention_a2e_seconds", "A2E dispatch of one MoE layer of a decode step.",
                                m.HOP_BUCKETS, ("layer",))
        self._e2a = m.histogram("xds:attention_e2a_seconds", "E2A wait of one MoE layer of a decode step "
                                "(expert compute + transfer + queueing).", m.HOP_BUCKETS, ("layer",))
        self._children: dict[int, tuple[Any, Any]] = {}
        m.sampled("xds:attention_redispatches", "MoE layers' rows re-dispatched to a replica after an expert "
                  "instance failed.", lambda: dispatcher.stats["retries"], kind="counter")
        m.sampled("xds:attention_expert_failures", "Expert instance failures seen by this rank's dispatcher.",
                  lambda: dispatcher.stats["rank_failures"], kind="counter")

    def layer(self, layer: int, a2e_s: float, e2a_s: float) -> None:
        c = self._children.get(layer)
        if c is None:
            c = self._children[layer] = (self._a2e.labels(str(layer)), self._e2a.labels(str(layer)))
        c[0].observe(a2e_s)
        c[1].observe(e2a_s)
