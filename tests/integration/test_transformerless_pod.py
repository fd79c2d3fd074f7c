"""The Transformerless decode path across real processes: a fabric simulator, a KV pool node,
4 expert instances and 2 attention ranks (2 DP groups), each started with
``python -m services.run --pod pod.yaml --name ...``. The test process is both decode masters
(XCCL endpoints ``decode-0`` and ``decode-1``) and the prefill: it stores the reference
engine's prefill KV in the pool, has each attention rank Load it, then decodes greedily with
``Run`` messages, group 1 stepping twice for every step of group 0. Tokens must equal the
reference engine's; every expert instance must have answered both groups."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.common.rpc import RpcClient
from services.common.runtime import ready_path
from tests.pods import TestPod
from services.common.wire import decode, encode
from services.expert.protocol import ExpertStats, ExpertStatsQuery
from services.kvpool.client import KVPoolClient
from services.model.engine import GenerationRequest, ReferenceEngine, prompt_ids
from services.model.sampling import SamplingParams, sample
from services.pod.spec import address, load_pod, service, services
from services.protocol.step import Free, Load, Loaded, Logits, Run
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.fabric_client import FabricClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
REPLY_TIMEOUT_S = 20.0
SERVICES = ["kvpool-0", "expert-0", "expert-1", "expert-2", "expert-3", "attention-0-0", "attention-1-0"]
PROMPTS = {0: ["The cat sat", "Hello, world!", "MoE"], 1: ["Transformerless", "a b c d e f"]}
MAX_TOKENS = {0: 5, 1: 10}   # group 1 makes twice as many steps


@pytest.fixture
def pod():
    """Fabric + pool + experts + attention ranks; stopped by PID; no /dev/shm entry left."""
    p = TestPod.create("tl", {"model": {"preset": "tiny", "seed": 3},
                              "decode": {"groups": 2, "attention_per_group": 1, "max_batch": 4, "kv_blocks": 16},
                              # Counts expert events exactly: a slow host must not cause a failover retry,
                              # and every instance gets every layer's block (no replica choice).
                              "experts": {"instances": 4, "replicas": 2, "answer_timeout_s": 30.0,
                                          "replica_choice": False},
                              "kv_pool": {"nodes": 1, "block_size": 4}})
    try:
        p.start(READY_TIMEOUT_S, only=SERVICES)
        yield load_pod(p.spec_file)   # the resolved spec: its model.dir is the files the services load
    finally:
        codes = p.stop()
    assert codes == dict.fromkeys(["fabric", *SERVICES], 0)


async def _master_endpoint(spec, name):
    fabric = await FabricClient.connect(address(spec, "fabric", "fabric"), name=name, npu=service(spec, name).npu,
                                        timeout_s=10.0)
    ep = await open_endpoint(EndpointConfig(name=name, namespace=spec.namespace, kind=spec.transport,
                                            npu=service(spec, name).npu, bell_dir=str(spec.run_path)), fabric=fabric)
    return fabric, ep


async def _request(ep, peer, msg):
    await ep.send(peer, encode(msg), timeout_s=REPLY_TIMEOUT_S)
    src, frames = await ep.recv(peer, timeout_s=REPLY_TIMEOUT_S)
    return decode(frames)


async def test_two_groups_decode_through_expert_processes_exactly(pod):
    spec = pod
    engine = ReferenceEngine.from_dir(spec.model.dir)
    params = {g: SamplingParams(max_tokens=MAX_TOKENS[g]) for g in PROMPTS}
    reqs = {g: [GenerationRequest(f"g{g}-r{i}", prompt_ids(t), params[g]) for i, t in enumerate(ts)]
            for g, ts in PROMPTS.items()}
    want = {r.request_id: res.token_ids for g in reqs for r, res in zip(reqs[g], engine.generate(reqs[g]))}

    opened = []
    try:
        for g in PROMPTS:
            opened.append(await _master_endpoint(spec, f"decode-{g}"))
        eps = {g: opened[g][1] for g in PROMPTS}
        # The prefill's part: the reference prefill's KV goes into the pool; first tokens kept.
        first: dict[str, int] = {}
        refs = {}
        pool = KVPoolClient(spec, eps[0], engine.cfg)
        try:
            for g in PROMPTS:
                seqs = [engine._start(r) for r in reqs[g]]
                engine.prefill(seqs)
                for s in seqs:
                    n = len(s.req.prompt_ids)
                    refs[s.req.request_id] = await pool.store(
                        s.req.prompt_ids, [(k[:, :n], v[:, :n]) for k, v in s.kv], s.req.request_id)
                    first[s.req.request_id] = s.output[0]
        finally:
            await pool.close()

        out = {r.request_id: [first[r.request_id]] for g in reqs for r in reqs[g]}
        group1_steps = asyncio.Condition()
        done1 = [0]

        async def decode_group(g: int) -> int:
            peer = f"attention-{g}-0"
            for r in reqs[g]:
                cap = len(r.prompt_ids) + r.params.max_tokens
                got = await _request(eps[g], peer, Load(r.request_id, refs[r.request_id], cap))
                assert got == Loaded(r.request_id), got
            steps = 0
            live = list(reqs[g])
            while live:
                if g == 0:  # group 0 steps once per two steps of group 1 (while group 1 runs)
                    async with group1_steps:
                        await asyncio.wait_for(group1_steps.wait_for(
                            lambda: done1[0] >= 2 * (steps + 1) or done1[0] >= MAX_TOKENS[1] - 1), REPLY_TIMEOUT_S)
                ids = tuple(r.request_id for r in live)
                toks = tuple(out[i][-1] for i in ids)
                pos = tuple(len(r.prompt_ids) + len(out[r.request_id]) - 1 for r in live)
                rep = await _request(eps[g], peer, Run(steps, ids, toks, pos))
                assert isinstance(rep, Logits) and rep.error == "" and rep.step == steps, rep
                for r, row, p in zip(live, rep.logits, pos):
                    out[r.request_id].append(sample(row, r.params, r.request_id, p + 1))
                steps += 1
                if g == 1:
                    async with group1_steps:
                        done1[0] = steps
                        group1_steps.notify_all()
                finished = [r for r in live if len(out[r.request_id]) >= r.params.max_tokens]
                if finished:
                    await eps[g].send(peer, encode(Free(tuple(r.request_id for r in finished))))
                live = [r for r in live if r not in finished]
            return steps

        async with asyncio.TaskGroup() as tg:
            t0, t1 = tg.create_task(decode_group(0)), tg.create_task(decode_group(1))
        assert (t0.result(), t1.result()) == (MAX_TOKENS[0] - 1, MAX_TOKENS[1] - 1)
        assert {rid: tuple(toks) for rid, toks in out.items()} == want

        # Every expert instance answered every MoE layer of every step of both groups.
        moe_layers = len(engine.cfg.moe_layers)
        attn = [s.name for s in services(spec) if s.role == "attention"]
        for i in range(spec.experts.instances):
            client = RpcClient(address(spec, f"expert-{i}", "rpc"))
            try:
                st = await client.call(ExpertStatsQuery(), timeout_s=REPLY_TIMEOUT_S)
            finally:
                await client.close()
            assert isinstance(st, ExpertStats) and st.sources == tuple(attn)
            assert st.events_per_source == (t0.result() * moe_layers, t1.result() * moe_layers), st
            assert all(r > 0 for r in st.rows_per_source) and st.rejected == 0, st
        ready = json.loads(ready_path(spec, "attention-1-0").read_text())
        assert ready["group"] == 1 and ready["source"] == 1
    finally:
        for fabric, ep in opened:
            await ep.close()
            await fabric.close()
