"""KV pool service in real processes (fabric simulator + pool nodes via ``services.run``) and the
client in the test process over real ZeroMQ sockets and real XCCL shared memory.

KV comes from the reference model; everything read back must be bitwise what was stored.
Every process is stopped by PID; no process, socket directory or /dev/shm entry is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from services.common.heartbeat import HeartbeatSubscriber
from services.common.rpc import RemoteError, RpcClient
from services.kvpool.client import KVPoolClient, KVPoolUnavailable
from services.kvpool.core import block_hashes
from services.model.cache import ensure_model
from services.model.config import ModelConfig
from services.model.engine import GenerationRequest, ReferenceEngine, SequenceState, new_kv
from services.model.sampling import SamplingParams
from services.pod.spec import address
from services.protocol.inference import KVRef
from services.protocol.kvpool import Acquire, Commit, Release, Reserve, Stats, StatsQuery
from xccl_net.endpoint import EndpointConfig, open_endpoint
from tests.pods import TestPod

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
BS = 16


# ---------------------------------------------------------------------- processes

class Pod(TestPod):
    """A fabric simulator and the pod's pool nodes, each a real process, stopped by PID."""

    @classmethod
    def with_nodes(cls, cache_dir: Path, **kv_pool: Any) -> Pod:
        return cls.create("kvt", {"cache_dir": str(cache_dir), "kv_pool": {"block_size": BS, **kv_pool}})

    def start(self, timeout_s: float = READY_TIMEOUT_S, **kw: Any) -> Pod:
        super().start(timeout_s, only=[f"kvpool-{i}" for i in range(self.spec.kv_pool.nodes)])
        return self

    def stop(self, grace_s: float = 5.0) -> dict[str, int]:
        # A SIGKILLed node cannot unlink its segment (TestPod allows exactly those); every other
        # node must have, and must have exited cleanly.
        codes = super().stop(grace_s)
        assert all(codes[n] == 0 for n in codes if n not in self.killed), codes
        return codes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    return ensure_model(None, "tiny", 0, str(cache))


@pytest.fixture
def make_pod(model_dir) -> Iterator[Any]:
    pods: list[Pod] = []

    def make(**kv_pool: Any) -> Pod:
        # ipc paths must stay short (108 bytes): a short root under /tmp, not pytest's tmp_path.
        pod = Pod.with_nodes(model_dir.parents[1], **kv_pool)
        pods.append(pod)
        return pod.start()

    yield make
    for pod in pods:
        pod.stop()


@pytest.fixture(scope="module")
def shared_pod(model_dir) -> Iterator[Pod]:
    pod = Pod.with_nodes(model_dir.parents[1], nodes=2, capacity_blocks=64)
    try:
        yield pod.start()
    finally:
        pod.stop()


class Side:
    """One service's view: its own XCCL endpoint and KV pool client."""

    def __init__(self, ep: Any, client: KVPoolClient) -> None:
        self.ep, self.client = ep, client


@pytest.fixture
async def open_sides():
    opened: list[Side] = []

    async def opener(pod: Pod, name: str, cfg: ModelConfig, **kw: Any) -> Side:
        ep = await open_endpoint(EndpointConfig(name=name, namespace=pod.spec.namespace, kind="shm",
                                                bell_dir=str(pod.spec.run_path)), fabric=None)
        opened.append(Side(ep, KVPoolClient(pod.spec, ep, cfg, **kw)))
        return opened[-1]

    yield opener
    for s in opened:
        await s.client.close()
        await s.ep.close()


@pytest.fixture(scope="module")
def engine(model_dir) -> ReferenceEngine:
    return ReferenceEngine.from_dir(model_dir)


def reference_kv(engine: ReferenceEngine, tokens: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    s = SequenceState(GenerationRequest("kv", tuple(tokens), SamplingParams(max_tokens=1)),
                      new_kv(engine.cfg, len(tokens)))
    engine.prefill([s])
    return s.kv


def prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


def assert_bitwise(got: list[tuple[np.ndarray, np.ndarray]], want: list[tuple[np.ndarray, np.ndarray]], n: int) -> None:
    assert len(got) == len(want)
    for li, ((k, v), (wk, wv)) in enumerate(zip(got, want)):
        assert k.shape == v.shape == (wk.shape[0], n, wk.shape[2]), (li, k.shape)
        assert k.tobytes() == np.ascontiguousarray(wk[:, :n]).tobytes(), f"layer {li} K differs"
        assert v.tobytes() == np.ascontiguousarray(wv[:, :n]).tobytes(), f"layer {li} V differs"


async def total(client: KVPoolClient) -> Stats:
    per = (await client.stats()).values()
    return Stats(*(sum(getattr(s, f) for s in per) for f in Stats.__dataclass_fields__))


# ---------------------------------------------------------------------- tests

async def test_store_load_and_prefix_fetch_are_bitwise_and_counted(shared_pod, open_sides, engine) -> None:
    prefill = await open_sides(shared_pod, "prefill-0", engine.cfg)
    attention = await open_sides(shared_pod, "attention-0-0", engine.cfg)
    a = prompt(1, 2 * BS + 8)                                         # 2 full blocks + a tail of 8
    kv_a = reference_kv(engine, a)
    before = await total(prefill.client)
    per_before = await prefill.client.stats()

    ref = await prefill.client.store(a, kv_a, "req-a")
    assert ref.num_tokens == len(a) and ref.block_size == BS
    assert list(ref.block_hashes) == block_hashes(a, BS) and len(ref.tail_key) == 16
    mid = await total(prefill.client)
    assert mid.ready - before.ready == 3 and mid.pinned - before.pinned == 3   # held for the hand-off
    assert (mid.hits, mid.misses) == (before.hits, before.misses)              # a store is not a lookup
    # Each key went to its node on the ring (this prompt's keys land on both nodes).
    per = await prefill.client.stats()
    placed = [prefill.client.ring.node_for(k) for k in (*ref.block_hashes, ref.tail_key)]
    assert set(placed) == {"kvpool-0", "kvpool-1"}
    assert {n: per[n].ready - per_before[n].ready for n in per} == {n: placed.count(n) for n in per}

    # Another service (its own endpoint and client) loads all 40 positions, tail included.
    kv = await attention.client.load(ref, "req-a")
    assert_bitwise(kv, kv_a, len(a))
    assert (await total(prefill.client)).pinned == before.pinned              # load dropped the hand-off pins

    # A longer prompt sharing the first 2 blocks: its prefix comes back exactly.
    b = a[:2 * BS] + prompt(2, 20)                                     # 52 tokens: 3 full blocks
    n, kv_b = await attention.client.fetch_prefix(b, "req-b")
    assert n == 2 * BS
    assert_bitwise(kv_b, kv_a, n)
    after = await total(prefill.client)
    assert (after.hits - mid.hits, after.misses - mid.misses) == (2, 1)
    assert after.pinned == before.pinned                              # fetch released its pins

    # An unrelated prompt is a miss; fewer tokens than a block is no lookup at all.
    n, kv_c = await prefill.client.fetch_prefix(prompt(3, 3 * BS), "req-c")
    assert n == 0 and all(k.shape == (engine.cfg.num_key_value_heads, 0, engine.cfg.head_dim) for k, _ in kv_c)
    assert (await prefill.client.fetch_prefix(a[:BS - 1], "req-c"))[0] == 0
    final = await total(prefill.client)
    assert (final.hits - after.hits, final.misses - after.misses) == (0, 3)


async def test_store_skips_present_blocks_and_release_frees_pins(shared_pod, open_sides, engine) -> None:
    prefill = await open_sides(shared_pod, "prefill-1", engine.cfg)
    a = prompt(11, 3 * BS)
    kv_a = reference_kv(engine, a)
    ref1 = await prefill.client.store(a, kv_a, "req-x")
    s1 = await total(prefill.client)
    # Same tokens by another request: no new block is written, both owners pin the 3 blocks.
    ref2 = await prefill.client.store(a, kv_a, "req-y")
    s2 = await total(prefill.client)
    assert ref1 == ref2 and s2.ready == s1.ready and s2.free == s1.free
    await prefill.client.release("req-x")
    assert (await total(prefill.client)).pinned == s2.pinned        # still pinned by req-y
    assert await prefill.client.release("req-y") == []
    s3 = await total(prefill.client)
    assert s3.pinned == s1.pinned - 3 and s3.ready == s1.ready    # unpinned but kept as a prefix cache
    # A ref whose blocks the pool does not hold is a typed error, not garbage KV.
    gone = KVRef(BS, BS, tuple(block_hashes(prompt(12, BS), BS)), b"")
    with pytest.raises(KVPoolUnavailable, match="no longer on"):
        await prefill.client.load(gone, "req-z", timeout_s=2)


async def test_store_waits_for_another_writer_and_takes_over_when_it_aborts(shared_pod, open_sides, engine) -> None:
    side = await open_sides(shared_pod, "prefill-3", engine.cfg)
    a = prompt(51, 2 * BS)
    kv_a = reference_kv(engine, a)
    first = block_hashes(a, BS)[0]
    other = RpcClient(address(shared_pod.spec, side.client.ring.node_for(first), "rpc"))
    try:
        held = await other.call(Reserve("other-writer", (first,)), timeout_s=5)
        assert held.hashes == (first,)
        # The first block is being written by someone else: the store waits for it, within its timeout.
        t0 = time.monotonic()
        with pytest.raises(KVPoolUnavailable, match="ran out of time"):
            await side.client.store(a, kv_a, "req-w", timeout_s=0.3)
        assert time.monotonic() - t0 < 1.0
        # The other writer gives up: the next store writes the block itself.
        await other.call(Release("other-writer", (), everything=True), timeout_s=5)
        ref = await side.client.store(a, kv_a, "req-w")
        assert_bitwise(await side.client.load(ref, "req-w"), kv_a, len(a))
    finally:
        await other.close()


async def test_garbage_and_invalid_requests_get_typed_errors_and_the_pool_keeps_serving(
        shared_pod, open_sides, engine) -> None:
    side = await open_sides(shared_pod, "prefill-2", engine.cfg)
    rpc = RpcClient(address(shared_pod.spec, "kvpool-0", "rpc"))
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address(shared_pod.spec, "kvpool-0", "rpc"))
    try:
        cases = [(Acquire("r", (b"short",)), "INVALID_ARGUMENT", "16 bytes"),
                 (Reserve("", (b"\0" * 16,)), "INVALID_ARGUMENT", "owner"),
                 (Commit("w", (b"\1" * 16,)), "NOT_FOUND", "not being written"),
                 (Release("w", (b"\1" * 16,), everything=True), "INVALID_ARGUMENT", "not both"),
                 (KVRef(1, 1, (), b""), "INVALID_ARGUMENT", "does not handle KVRef")]
        for msg, code, words in cases:
            with pytest.raises(RemoteError) as info:
                await rpc.call(msg, timeout_s=5)
            assert info.value.code == code and words in info.value.message, info.value
        # Undecodable frames with a request id: answered INVALID_ARGUMENT; without: dropped.
        raw.send_multipart([(7).to_bytes(8, "little"), b"\xc1not msgpack"])
        assert raw.poll(5000), "no answer to garbage"
        reply = raw.recv_multipart()
        assert reply[0] == (7).to_bytes(8, "little") and b"INVALID_ARGUMENT" in b"".join(reply[1:])
        raw.send_multipart([b"x"])
        # Still serving, state untouched by any of it.
        st = await rpc.call(StatsQuery(), timeout_s=5)
        assert isinstance(st, Stats) and st.writing == 0
        a = prompt(21, BS)
        ref = await side.client.store(a, reference_kv(engine, a), "req-g")
        assert (await side.client.fetch_prefix(a, "req-g2"))[0] == BS
        await side.client.release("req-g")
        assert ref.num_tokens == BS
    finally:
        raw.close(0)
        await rpc.close()


async def test_lru_eviction_and_a_full_pool(make_pod, open_sides, engine) -> None:
    pod = make_pod(nodes=1, capacity_blocks=8)
    side = await open_sides(pod, "prefill-0", engine.cfg)
    c = side.client
    seqs = {name: prompt(30 + i, 4 * BS) for i, name in enumerate("abcde")}   # 4 blocks each, no tail
    kvs = {name: reference_kv(engine, t) for name, t in seqs.items()}
    for name in "ab":
        await c.store(seqs[name], kvs[name], name)
        await c.release(name)
    assert (await c.fetch_prefix(seqs["a"], "look"))[0] == 4 * BS    # touch a: b is now least recently used
    await c.store(seqs["c"], kvs["c"], "c")                           # needs 4 slots: evicts b, keeps a
    st = (await c.stats())["kvpool-0"]
    assert (st.evictions, st.ready, st.free) == (4, 8, 0)
    assert (await c.fetch_prefix(seqs["b"], "look"))[0] == 0
    n, kv = await c.fetch_prefix(seqs["a"], "look")
    assert n == 4 * BS
    assert_bitwise(kv, kvs["a"], n)
    await c.store(seqs["d"], kvs["d"], "d")                           # evicts a (c is pinned)
    # c and d pinned: nothing to evict. The store fails fast with a typed error, holding nothing.
    t0 = time.monotonic()
    with pytest.raises(KVPoolUnavailable, match="full"):
        await c.store(seqs["e"], kvs["e"], "e", timeout_s=5)
    assert time.monotonic() - t0 < 2.0
    st = (await c.stats())["kvpool-0"]
    assert (st.pinned, st.writing, st.ready) == (8, 0, 8)
    # The heartbeat publishes the same numbers (routers and prefills learn load only from beats).
    beats: asyncio.Queue = asyncio.Queue()
    sub = HeartbeatSubscriber([address(pod.spec, "kvpool-0", "heartbeat")], on_beat=beats.put_nowait)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(sub.run())
        beat = await asyncio.wait_for(beats.get(), 5)
        task.cancel()
    assert beat.service == "kvpool-0" and beat.role == "kvpool"
    assert beat.load == {"free_blocks": 0.0, "ready_blocks": 8.0, "pinned_blocks": 8.0, "writing_blocks": 0.0,
                         "hits": float(st.hits), "misses": float(st.misses), "evictions": 8.0,
                         # every XCCL service's beat also carries its fabric client's state
                         "fabric_modelled": 1.0, "fabric_unmodelled_transfers": 0.0, "fabric_outages": 0.0,
                         # on the shared link table (the pool itself starts no transfer)
                         "fabric_local": 1.0, "fabric_local_reserves": 0.0}
    await c.release("c")
    ref = await c.store(seqs["e"], kvs["e"], "e")
    assert_bitwise(await c.load(ref, "e"), kvs["e"], 4 * BS)
    n, kv = await c.fetch_prefix(seqs["d"], "look")                   # d was pinned: still there
    assert n == 4 * BS
    assert_bitwise(kv, kvs["d"], n)


async def test_killed_pool_gives_typed_errors_within_the_timeout(make_pod, open_sides, engine) -> None:
    pod = make_pod(nodes=1, capacity_blocks=16)
    side = await open_sides(pod, "prefill-0", engine.cfg)
    fresh = await open_sides(pod, "attention-0-0", engine.cfg, retry_after_s=0)
    a = prompt(41, BS + 3)
    kv_a = reference_kv(engine, a)
    ref = await side.client.store(a, kv_a, "req-k")
    pod.kill("kvpool-0")

    async def timed(coro: Any) -> tuple[Any, float]:
        t0 = time.monotonic()
        try:
            out = await coro
        except KVPoolUnavailable as exc:
            out = exc
        return out, time.monotonic() - t0

    out, dt = await timed(side.client.store(a, kv_a, "req-k2", timeout_s=1.0))
    assert isinstance(out, KVPoolUnavailable) and 0.9 <= dt < 2.0, (out, dt)
    # The node is now skipped for a while: lookups are instant misses, loads instant errors.
    out, dt = await timed(side.client.fetch_prefix(a, "req-k3", timeout_s=1.0))
    assert out[0] == 0 and dt < 0.5
    out, dt = await timed(side.client.load(ref, "req-k", timeout_s=1.0))
    assert isinstance(out, KVPoolUnavailable) and "skipped" in str(out) and dt < 0.5
    assert await side.client.release("req-k", timeout_s=0.5) == ["kvpool-0"]
    # Without the skip, every call still ends by its own timeout.
    out, dt = await timed(fresh.client.load(ref, "req-k", timeout_s=1.0))
    assert isinstance(out, KVPoolUnavailable) and dt < 2.0
    out, dt = await timed(fresh.client.fetch_prefix(a, "req-k4", timeout_s=1.0))
    assert out[0] == 0 and dt < 2.0
