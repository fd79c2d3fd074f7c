"""Expert instance: holds only its placed experts, takes the layer from the event id, refuses an
event for a dense layer as a peer violation and keeps serving."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from services.common.config import ConfigError
from services.expert.core import ExpertInstance
from services.expert.geometry import pod_dispatch
from services.model import layers as L
from services.model.engine import ReferenceEngine
from services.pod.spec import pod_from_mapping
from xccl_net.dispatch import A2EDispatcher, E2AHandler
from xccl_net.dispatch_core import BlockMeta, DispatchLayout, Placement, encode_meta, pack_event_id
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.errors import CorruptMetadata
from xccl_net.mem import MemoryHub

ENGINE = ReferenceEngine.from_preset("tiny", seed=2)
CFG = ENGINE.cfg


def test_holds_only_hosted_experts_of_moe_layers_and_computes_them_like_the_reference():
    inst = ExpertInstance(CFG, ENGINE.weights, {1, 5})
    assert sorted(inst.experts) == CFG.moe_layers
    assert all(sorted(t) == [1, 5] for t in inst.experts.values())
    layer = CFG.moe_layers[-1]
    rows = np.random.default_rng(0).standard_normal((5, CFG.hidden_size)).astype(np.float32)
    got = inst.select(pack_event_id(layer, 123, 2))(5, rows)
    assert got.tobytes() == L.ffn(ENGINE.weights.layers[layer].experts[5], rows).tobytes()
    for bad_layer in (0, CFG.num_hidden_layers, 999):  # layer 0 is dense in the tiny preset
        with pytest.raises(CorruptMetadata, match=f"layer {bad_layer}"):
            inst.select(pack_event_id(bad_layer, 1))


def test_pod_geometry_follows_the_spec():
    spec = pod_from_mapping({"decode": {"groups": 3, "attention_per_group": 2, "max_batch": 5},
                             "experts": {"instances": 3, "replicas": 2}})
    geo = pod_dispatch(spec, CFG)
    assert geo.sources == ("attention-0-0", "attention-0-1", "attention-1-0", "attention-1-1",
                           "attention-2-0", "attention-2-1")
    assert geo.experts == ("expert-0", "expert-1", "expert-2")
    assert geo.layout == DispatchLayout(6, 3, 5 * CFG.num_experts_per_tok, CFG.hidden_size)
    assert geo.placement == Placement.round_robin(CFG.n_routed_experts, 3, 2)
    with pytest.raises(ConfigError):
        pod_from_mapping({"experts": {"instances": 2, "replicas": 3}})


async def test_dense_layer_event_is_rejected_and_the_instance_keeps_serving():
    hub, ns = MemoryHub(), f"e{uuid.uuid4().hex[:8]}"
    layout = DispatchLayout(1, 1, 8, CFG.hidden_size)
    placement = Placement.round_robin(CFG.n_routed_experts, 1, 1)
    src = await open_endpoint(EndpointConfig(name="attention-0-0", namespace=ns, kind="mem",
                                             windows={"e2a": layout.e2a_window_bytes}), hub=hub)
    exp = await open_endpoint(EndpointConfig(name="expert-0", namespace=ns, kind="mem",
                                             windows={"a2e": layout.a2e_window_bytes}), hub=hub)
    try:
        inst = ExpertInstance(CFG, ENGINE.weights, placement.hosted(0))
        h = E2AHandler(exp, rank=0, source_peers=["attention-0-0"], placement=placement, layout=layout)
        await src.put("expert-0", "a2e", 0, b"", notify=encode_meta(BlockMeta(
            event_id=pack_event_id(0, 0), sender=0, offset=0, count=0, expert_ids=np.empty(0, np.int32))))
        with pytest.raises(CorruptMetadata, match="not an MoE layer"):
            await h.serve_event(select=inst.select, timeout_s=2.0)
        assert h.stats["rejected_notices"] == 1 and h.per_source == [[0, 0]]
        # The same step's MoE layer is still new (the refusal left no trace) and computes exactly.
        d = A2EDispatcher(src, source=0, expert_peers=["expert-0"], placement=placement, layout=layout)
        layer = CFG.moe_layers[0]
        lw = ENGINE.weights.layers[layer]
        x = np.random.default_rng(1).standard_normal((3, CFG.hidden_size)).astype(np.float32)
        ids, w = L.gate(CFG, lw, x)
        pending = await d.start_layer(pack_event_id(layer, 0), x, ids, timeout_s=2.0)
        served = await h.serve_event(select=inst.select, timeout_s=2.0)
        got = await d.finish_layer(pending, w)
        assert (served.source, served.rows) == (0, 3 * CFG.num_experts_per_tok)
        assert got.tobytes() == L.combine(L.run_experts_grouped(lw, x, ids), w, None).tobytes()
    finally:
        await src.close()
        await exp.close()
