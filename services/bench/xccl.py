"""`xds bench xccl`: XCCL p2p, dispatch/combine and fabric fidelity against same-run baselines.

Every ratio compares numbers measured in this run on this machine (MEASUREMENTS.md: never
compare absolute times across runs). Peers run in separate processes (``xccl_peers``),
stopped by PID when the bench ends.

Targets (reported pass/fail, never tuned; thresholds from issue 13 where it sets one):
- p2p send/recv_into at 16 MiB into a buffer the receiver posted in its registered window (the
  sender writes the message straight into it) >= 0.8 x a raw numpy copy into pre-touched shared
  memory; reported beside it: recv_into a pre-touched reused private buffer (ring -> buffer) and
  plain ``recv`` (ring -> fresh buffer);
- one-sided put at 16 MiB >= 0.5 x the same copy;
- p2p 64 B round trip <= 1.0 x a raw zmq.asyncio ipc round trip (both with uvloop);
- a 16 MiB p2p transfer >= 5 x faster than one 16 MiB message of a grpc.aio stream;
- fabric fidelity: median |measured - target| / target <= 5 %, where target = the delay the
  simulator granted (reserve reply) and measured = reserve reply -> receiver sees the data;
  with ``--under-load READY`` measured a second time while that pod serves a closed loop of
  ``--load-concurrency`` streams (issue 13's condition), the load proven by the decode steps it
  took during the measurement and the cores the pod kept busy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from services.bench.xccl_peers import (
    ECHO,
    GRPC_MAX,
    GRPC_METHOD,
    INTO,
    KIB,
    MIB,
    P2P_RING_SLOTS,
    P2P_SLOT_BYTES,
    SINK,
    STAMP,
    endpoint_config,
    fabric_process,
    peer_process,
)

HELP = "XCCL p2p / dispatch+combine / fabric-fidelity benchmark with same-run baselines"


@dataclass(frozen=True, slots=True)
class BenchPlan:
    """Repetition counts: the full run stays under ~2 minutes, ``--quick`` a few seconds."""

    rtt_sizes: tuple[int, ...] = (64, 4 * KIB, MIB, 16 * MIB)
    rtt_reps: tuple[int, ...] = (2000, 1000, 200, 20)
    bw_sizes: tuple[int, ...] = (MIB, 16 * MIB, 64 * MIB)
    bw_reps: tuple[int, ...] = (200, 30, 8)
    grpc_messages: int = 20
    dispatch_cases: tuple[tuple[int, int, int, int], ...] = ((2, 4, 64, 512), (4, 8, 256, 512))
    dispatch_reps: int = 100
    fidelity_transfers: int = 50
    tcp: bool = True

    @classmethod
    def quick(cls) -> BenchPlan:
        return cls(rtt_reps=(100, 50, 10, 3), bw_sizes=(MIB, 16 * MIB), bw_reps=(10, 3), grpc_messages=3,
                   dispatch_cases=((2, 4, 64, 512),), dispatch_reps=5, fidelity_transfers=8, tcp=False)


# ---------------------------------------------------------------- statistics


def summary(samples_s: list[float]) -> dict[str, float]:
    """Median / p99 / min in microseconds over ``samples_s`` (seconds)."""
    xs = sorted(samples_s)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return {"n": len(xs), "median_us": statistics.median(xs) * 1e6, "p99_us": p99 * 1e6, "min_us": xs[0] * 1e6}


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# ---------------------------------------------------------------- raw baselines


def bench_shm_copy(sizes: tuple[int, ...], reps: tuple[int, ...]) -> dict[str, Any]:
    """numpy copy of a private buffer into a pre-touched shared-memory segment."""
    out: dict[str, Any] = {}
    for size, n in zip(sizes, reps):
        seg = shared_memory.SharedMemory(create=True, size=size)
        try:
            dst = np.ndarray((size,), dtype=np.uint8, buffer=seg.buf)
            src = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
            dst[:] = 1  # pre-touch: a cold segment is ten times slower
            times = []
            for _ in range(max(n, 3)):
                t0 = time.perf_counter()
                np.copyto(dst, src)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out[str(size)] = {"median_us": med * 1e6, "gbps": gbps(size, med)}
            del dst
        finally:
            seg.close()
            seg.unlink()
    return out


async def bench_zmq_rtt(address: str, sizes: tuple[int, ...], reps: tuple[int, ...]) -> dict[str, Any]:
    """Raw ZeroMQ ipc round trip with zmq.asyncio on both ends (the baseline XCCL must approach)."""
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(address)
    out: dict[str, Any] = {}
    try:
        for size, n in zip(sizes, reps):
            payload = np.ones(size, dtype=np.uint8)
            for _ in range(min(20, n)):  # warm-up
                await sock.send(payload, copy=False)
                await asyncio.wait_for(sock.recv(copy=False), 10)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                await sock.send(payload, copy=False)
                await asyncio.wait_for(sock.recv(copy=False), 10)
                times.append(time.perf_counter() - t0)
            out[str(size)] = summary(times)
    finally:
        sock.close(linger=0)
        ctx.term()
    return out


async def bench_grpc_stream(port: str, size: int, messages: int) -> dict[str, Any]:
    """grpc.aio client stream of ``messages`` BytesValue messages of ``size`` bytes each."""
    import grpc
    from google.protobuf import wrappers_pb2

    payload = wrappers_pb2.BytesValue(value=bytes(np.ones(size, dtype=np.uint8)))
    opts = [("grpc.max_receive_message_length", GRPC_MAX), ("grpc.max_send_message_length", GRPC_MAX)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        push = channel.stream_unary(GRPC_METHOD, request_serializer=wrappers_pb2.BytesValue.SerializeToString,
                                    response_deserializer=wrappers_pb2.UInt64Value.FromString)

        async def stream(n: int) -> float:
            async def gen() -> Any:
                for _ in range(n):
                    yield payload

            t0 = time.perf_counter()
            reply = await asyncio.wait_for(push(gen()), 120)
            elapsed = time.perf_counter() - t0
            if reply.value != n * size:
                raise RuntimeError(f"grpc sink counted {reply.value} bytes, sent {n * size}")
            return elapsed

        await stream(1)  # warm-up: connection windows, allocator
        elapsed = await stream(messages)
    per = elapsed / messages
    return {"message_bytes": size, "messages": messages, "per_message_us": per * 1e6, "gbps": gbps(size, per)}


# ---------------------------------------------------------------- XCCL p2p


async def bench_xccl_p2p(kind: str, namespace: str, run_dir: str, plan: BenchPlan) -> dict[str, Any]:
    """Round trips and one-way bandwidth against the echo peer process, fabric=None."""
    from xccl_net.endpoint import open_endpoint

    cfg = endpoint_config(kind, "bench", namespace, 0, run_dir, slot_bytes=P2P_SLOT_BYTES,
                          ring_slots=P2P_RING_SLOTS)
    ep = await open_endpoint(cfg, fabric=None)
    try:
        # tcp: the peer learns our address from its argv and tells us its own when ready.
        extra = ["--peer-address", f"bench={ep.address}"] if kind == "tcp" else []
        with peer_process("xccl-echo", kind, namespace, run_dir, *extra) as info:
            if kind == "tcp":
                ep.set_peer_address("echo", info)
            return await _p2p_measure(ep, plan)
    finally:
        await ep.close()


async def _p2p_measure(ep: Any, plan: BenchPlan) -> dict[str, Any]:
    out: dict[str, Any] = {"rtt": {}, "bandwidth": {}}
    for size, n in zip(plan.rtt_sizes, plan.rtt_reps):
        payload = np.ones(size, dtype=np.uint8)
        for _ in range(min(20, n)):
            await ep.send("echo", [ECHO, payload], timeout_s=30.0)
            await ep.recv("echo", timeout_s=30.0)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await ep.send("echo", [ECHO, payload], timeout_s=30.0)
            _, frames = await ep.recv("echo", timeout_s=30.0)
            times.append(time.perf_counter() - t0)
        if sum(memoryview(f).nbytes for f in frames) != size + 1:
            raise RuntimeError(f"echo returned a wrong payload size for {size} B")
        out["rtt"][str(size)] = summary(times)
    for size, n in zip(plan.bw_sizes, plan.bw_reps):
        payload = np.ones(size, dtype=np.uint8)
        await ep.send("echo", [SINK, payload], timeout_s=30.0)  # warm-up: touches the ring
        times = []
        for _ in range(max(n, 3)):
            # send completes when the receiver acknowledged: one full transfer.
            t0 = time.perf_counter()
            await ep.send("echo", [SINK, payload], timeout_s=30.0)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out["bandwidth"][str(size)] = {**summary(times), "gbps": gbps(size, med)}
        # The same transfers received with recv_into into the peer's pre-touched, reused
        # buffer (posted ahead): one copy on each side and no allocation on the receive side.
        out.setdefault("into_bandwidth", {})[str(size)] = await _into_bandwidth(ep, payload, n, b"1")
        # ... and into a buffer in the peer's registered window: shm lets the sender write the
        # message straight into it (one copy end to end, as put).
        out.setdefault("into_window_bandwidth", {})[str(size)] = await _into_bandwidth(ep, payload, n, b"w")
        # One-sided put into the peer's registered window (the bulk-move primitive, e.g. KV
        # hand-off): one copy, where send/recv copies into the ring and out again.
        await ep.put("echo", "bulk", 0, payload, timeout_s=30.0)  # warm-up: touches the window
        times = []
        for _ in range(max(n, 3)):
            t0 = time.perf_counter()
            await ep.put("echo", "bulk", 0, payload, timeout_s=30.0)
            times.append(time.perf_counter() - t0)
        out.setdefault("put_bandwidth", {})[str(size)] = {**summary(times),
                                                          "gbps": gbps(size, statistics.median(times))}
    out["stats"] = dict(ep.stats)
    return out


async def _into_bandwidth(ep: Any, payload: np.ndarray, n: int, mode: bytes) -> dict[str, Any]:
    await ep.send("echo", [INTO, mode], timeout_s=30.0)
    before = json.loads(bytes((await ep.recv("echo", timeout_s=30.0))[1][1]))
    await ep.send("echo", [SINK, payload], timeout_s=30.0)  # warm-up, as above
    times = []
    for _ in range(max(n, 3)):
        t0 = time.perf_counter()
        await ep.send("echo", [SINK, payload], timeout_s=30.0)
        times.append(time.perf_counter() - t0)
    await ep.send("echo", [INTO, b"0"], timeout_s=30.0)
    after = json.loads(bytes((await ep.recv("echo", timeout_s=30.0))[1][1]))
    # How the peer's receives went: straight from its ring (direct) or copied from a fresh buffer.
    how = {k: after[f"recvs_into_{k}"] - before[f"recvs_into_{k}"] for k in ("direct", "copied", "sender_wrote")}
    return {**summary(times), "gbps": gbps(payload.nbytes, statistics.median(times)), "receives": how}


# ---------------------------------------------------------------- dispatch + combine


async def bench_dispatch(case: tuple[int, int, int, int], reps: int, namespace: str, run_dir: str,
                         kind: str = "shm", top_k: int = 2) -> dict[str, Any]:
    """M attention + N expert endpoints in this process, identity experts, fabric=None.

    Latency of one layer = all M ``run_layer`` calls run concurrently, start to last return.
    The first layer is checked bitwise against the direct computation.
    """
    from xccl_net.dispatch import A2EDispatcher, E2AHandler
    from xccl_net.dispatch_core import DispatchLayout, Placement, pack_event_id, reference_moe
    from xccl_net.endpoint import open_endpoint

    m, n, tokens, hidden = case
    num_experts = 2 * n
    layout = DispatchLayout(num_sources=m, num_ranks=n, capacity_rows=tokens * top_k, hidden=hidden)
    placement = Placement.round_robin(num_experts, n)
    attn_names = [f"attn{s}" for s in range(m)]
    exp_names = [f"exp{r}" for r in range(n)]
    eps = []
    try:
        for s, name in enumerate(attn_names):
            eps.append(await open_endpoint(endpoint_config(
                kind, name, namespace, s, run_dir, slot_bytes=64 * KIB, ring_slots=8,
                windows={"e2a": layout.e2a_window_bytes}), fabric=None))
        for r, name in enumerate(exp_names):
            eps.append(await open_endpoint(endpoint_config(
                kind, name, namespace, m + r, run_dir, slot_bytes=64 * KIB, ring_slots=8,
                windows={"a2e": layout.a2e_window_bytes}), fabric=None))
        dispatchers = [A2EDispatcher(eps[s], source=s, expert_peers=exp_names, placement=placement, layout=layout)
                       for s in range(m)]
        handlers = [E2AHandler(eps[m + r], rank=r, source_peers=attn_names, placement=placement, layout=layout)
                    for r in range(n)]
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((tokens, hidden)).astype(np.float32) for _ in range(m)]
        ids = [np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)]) for _ in range(m)]
        ws = [rng.random((tokens, top_k)).astype(np.float32) for _ in range(m)]

        def identity(e: int, rows: np.ndarray) -> np.ndarray:
            return rows

        times = []
        async with asyncio.TaskGroup() as tg:
            stop = asyncio.Event()

            async def serve(h: E2AHandler) -> None:
                while not stop.is_set():
                    await h.serve_event(identity, timeout_s=30.0)

            servers = [tg.create_task(serve(h)) for h in handlers]
            for step in range(reps + 3):
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(d.run_layer(pack_event_id(0, step), xs[s], ids[s], ws[s], timeout_s=30.0)
                                              for s, d in enumerate(dispatchers)))
                if step == 0:
                    want = reference_moe(xs, ids, ws, identity)
                    if any(a.tobytes() != b.tobytes() for a, b in zip(outs, want)):
                        raise RuntimeError(f"dispatch case {case}: result differs from the direct computation")
                elif step >= 3:
                    times.append(time.perf_counter() - t0)
            stop.set()
            for t in servers:
                t.cancel()
    finally:
        for ep in eps:
            await ep.close()
    return {"attention_ranks": m, "expert_ranks": n, "tokens": tokens, "hidden": hidden, "top_k": top_k,
            "kind": kind, **summary(times)}


# ---------------------------------------------------------------- fabric fidelity

FIDELITY_TIME_SCALE = 5000.0
FIDELITY_BYTES = 64 * KIB


class RecordingFabric:
    """The real fabric client, plus the wall time of each reserve reply and the delay granted.

    Not a stand-in: every call goes to the real client; this only timestamps the answer, which
    is the start of the fidelity measurement.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self.grants: list[tuple[float, float]] = []

    @property
    def is_ideal(self) -> bool:
        return bool(self._client.is_ideal)

    @property
    def npu(self) -> int:
        return int(self._client.npu)

    async def reserve(self, dst_npu: int, nbytes: int, **kw: Any) -> float:
        delay = await self._client.reserve(dst_npu, nbytes, **kw)
        self.grants.append((time.monotonic(), delay))
        return delay

    async def wait_until(self, deadline: float) -> None:
        await self._client.wait_until(deadline)


def _fabric_config_yaml(path: str, ipc_dir: str) -> None:
    import yaml

    cfg = {"servers": 2, "npus_per_server": 8, "time_scale": FIDELITY_TIME_SCALE,
           "data_address": f"ipc://{ipc_dir}/fabric.sock"}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


async def bench_fidelity(fabric_address: str, namespace: str, run_dir: str, transfers: int) -> dict[str, Any]:
    """Sequential sends of FIDELITY_BYTES to the echo peer (which stamps arrival and replies).

    target = delay granted by the simulator for the send; measured = receiver's
    ``time.monotonic()`` when ``recv`` returned - our ``time.monotonic()`` when the grant
    arrived (CLOCK_MONOTONIC is one clock for all processes of the host).
    """
    from xccl_net.endpoint import open_endpoint
    from xccl_net.fabric_client import FabricClient

    client = await FabricClient.connect(fabric_address, name="bench", npu=0, timeout_s=5.0)
    fabric = RecordingFabric(client)
    cfg = endpoint_config("shm", "bench", namespace, 0, run_dir, slot_bytes=P2P_SLOT_BYTES,
                           ring_slots=P2P_RING_SLOTS)
    ep = await open_endpoint(cfg, fabric=fabric)
    errors, targets = [], []
    payload = np.ones(FIDELITY_BYTES, dtype=np.uint8)
    try:
        for i in range(transfers + 2):
            fabric.grants.clear()
            await ep.send("echo", [STAMP, payload], timeout_s=30.0)
            granted_at, target = fabric.grants[0]
            _, frames = await ep.recv("echo", timeout_s=30.0)
            seen_at = float(np.frombuffer(bytes(frames[1]), dtype=np.float64)[0])
            if i >= 2:  # first two warm the ring and the sim's registration
                targets.append(target)
                errors.append(abs((seen_at - granted_at) - target) / target)
    finally:
        await ep.close()
        await client.close()
    errs = sorted(errors)
    return {"definition": "target = delay granted by reserve(); measured = receiver visibility "
                          "(its monotonic clock at recv) - our monotonic clock when reserve() returned",
            "transfers": len(errs), "bytes": FIDELITY_BYTES, "time_scale": FIDELITY_TIME_SCALE,
            "target_median_ms": statistics.median(targets) * 1e3, "target_min_ms": min(targets) * 1e3,
            "rel_error_median": statistics.median(errs),
            "rel_error_p99": errs[min(len(errs) - 1, int(round(0.99 * (len(errs) - 1))))],
            "rel_error_max": errs[-1]}


# ---------------------------------------------------------------- the run


def _target(name: str, value: float, op: str, threshold: float) -> dict[str, Any]:
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"name": name, "value": value, "op": op, "threshold": threshold, "pass": bool(ok)}


async def _bench_all(plan: BenchPlan, work: str) -> dict[str, Any]:
    res: dict[str, Any] = {"plan": {"quick": plan == BenchPlan.quick()}}
    res["baselines"] = {"shm_copy": bench_shm_copy(plan.bw_sizes, plan.bw_reps)}
    with peer_process("zmq-echo", f"ipc://{work}/zmq-echo.sock") as address:
        res["baselines"]["zmq_asyncio_rtt"] = await bench_zmq_rtt(address, plan.rtt_sizes, plan.rtt_reps)
    with peer_process("grpc-sink") as port:
        res["baselines"]["grpc_stream"] = await bench_grpc_stream(port, 16 * MIB, plan.grpc_messages)
    res["p2p"] = {}
    for kind in ("shm", "tcp") if plan.tcp else ("shm",):
        ns = f"bx{os.getpid()}{kind}"
        res["p2p"][kind] = await bench_xccl_p2p(kind, ns, work, plan)
    res["dispatch"] = [await bench_dispatch(case, plan.dispatch_reps, f"bd{os.getpid()}{i}", work)
                       for i, case in enumerate(plan.dispatch_cases)]
    res["fidelity"] = await _fidelity(work, plan, "bf")
    return res


async def _fidelity(work: str, plan: BenchPlan, tag: str) -> dict[str, Any]:
    """The fidelity measurement with its own simulator process and echo peer."""
    cfg_path = os.path.join(work, f"{tag}-fabric.yaml")
    _fabric_config_yaml(cfg_path, os.path.join(work, tag))
    os.makedirs(os.path.join(work, tag), exist_ok=True)
    with fabric_process(cfg_path, os.path.join(work, f"{tag}-fabric.ready")) as fabric_address:
        ns = f"{tag}{os.getpid()}"
        with peer_process("xccl-echo", "shm", ns, work, "--fabric", fabric_address):
            return await bench_fidelity(fabric_address, ns, work, plan.fidelity_transfers)


# ---------------------------------------------------------------- fidelity under a pod's load

LOAD_WARMUP_STEPS = 20      # decode steps the pod must take under the load before measuring
LOAD_START_TIMEOUT_S = 120.0
LOAD_STOP_TIMEOUT_S = 15.0


def _decode_steps(loads: dict[str, dict[str, float]]) -> float:
    return sum(v.get("prof_steps", 0.0) for n, v in loads.items() if n.startswith("attention-"))


async def fidelity_under_load(ready_file: str, concurrency: int, plan: BenchPlan, work: str) -> dict[str, Any]:
    """Fabric fidelity while a running pod (``xds up``'s ready file) serves a closed loop of
    ``concurrency`` streams (``xds bench serve --duration``, a subprocess in its own session).

    The load proves itself: the measurement starts only after the pod took ``LOAD_WARMUP_STEPS``
    decode steps under it, and the report says how many it took and how many cores the pod kept
    busy during the measurement (its processes' CPU time from /proc). The load is stopped by PID
    (SIGTERM, then SIGKILL) whatever happens.
    """
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from services.bench.cpu import cpu_seconds
    from services.bench.profile import ProfileProbe
    from services.pod.spec import load_pod

    info = json.loads(Path(ready_file).read_text())
    pod_file = Path(info["run_dir"]) / "pod.yaml"
    if not pod_file.is_file():
        raise FileNotFoundError(f"{ready_file} names run_dir {info['run_dir']}, which has no pod.yaml")
    spec = load_pod(str(pod_file))
    pids = {n: int(p) for n, p in info.get("pids", {}).items()}
    log_path = os.path.join(work, "load.err")
    cmd = [sys.executable, "-m", "services.cli", "bench", "serve", "--ready-file", ready_file, "--pod", str(pod_file),
           "--duration", "3600", "--max-concurrency", str(concurrency), "--max-tokens", "32", "--prompt-len", "64",
           "--json"]
    with open(log_path, "w") as log_file:
        load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    loop = asyncio.get_running_loop()

    def load_failed(what: str) -> RuntimeError:
        tail = Path(log_path).read_text()[-2000:]
        return RuntimeError(f"the load generator {what} (exit code {load.poll()}): {tail}")

    try:
        async with ProfileProbe(spec) as probe:
            first = await probe.snapshot()
            deadline = loop.time() + LOAD_START_TIMEOUT_S
            while True:
                if load.poll() is not None:
                    raise load_failed("exited before the pod was loaded")
                start = await probe.snapshot()
                if _decode_steps(start) - _decode_steps(first) >= LOAD_WARMUP_STEPS:
                    break
                if loop.time() > deadline:
                    raise TimeoutError(f"the pod took fewer than {LOAD_WARMUP_STEPS} decode steps in "
                                       f"{LOAD_START_TIMEOUT_S:g} s of load")
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            res = await _fidelity(work, plan, "bl")
            cpu1, elapsed = cpu_seconds(pids), time.monotonic() - t0
            end = await probe.snapshot()
            if load.poll() is not None:
                raise load_failed("stopped during the measurement")
    finally:
        if load.poll() is None:
            os.killpg(load.pid, signal.SIGTERM)
            try:
                load.wait(LOAD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(load.pid, signal.SIGKILL)
                load.wait(LOAD_STOP_TIMEOUT_S)
    busy = sum(cpu1[n] - cpu0[n] for n in cpu1 if n in cpu0)
    res["load"] = {"concurrency": concurrency, "generator_pid": load.pid, "seconds": elapsed,
                   "decode_steps_during": _decode_steps(end) - _decode_steps(start),
                   "pod_cores_busy": busy / elapsed if elapsed > 0 else 0.0}
    return res


def _ratios(res: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    base, shm = res["baselines"], res["p2p"]["shm"]
    mib16 = str(16 * MIB)
    r = {
        "bw16_p2p_over_shm_copy": shm["bandwidth"][mib16]["gbps"] / base["shm_copy"][mib16]["gbps"],
        "bw16_p2p_into_over_shm_copy": shm["into_bandwidth"][mib16]["gbps"] / base["shm_copy"][mib16]["gbps"],
        "bw16_p2p_into_window_over_shm_copy": (shm["into_window_bandwidth"][mib16]["gbps"]
                                               / base["shm_copy"][mib16]["gbps"]),
        "bw16_put_over_shm_copy": shm["put_bandwidth"][mib16]["gbps"] / base["shm_copy"][mib16]["gbps"],
        "rtt64_p2p_over_zmq_asyncio": shm["rtt"]["64"]["median_us"] / base["zmq_asyncio_rtt"]["64"]["median_us"],
        "transfer16_grpc_over_p2p": base["grpc_stream"]["per_message_us"] / shm["bandwidth"][mib16]["median_us"],
    }
    if "tcp" in res["p2p"]:  # informational: the fallback transport against the same baselines
        tcp = res["p2p"]["tcp"]
        r["transfer16_grpc_over_tcp_p2p"] = base["grpc_stream"]["per_message_us"] / tcp["bandwidth"][mib16]["median_us"]
        r["rtt64_tcp_p2p_over_zmq_asyncio"] = tcp["rtt"]["64"]["median_us"] / base["zmq_asyncio_rtt"]["64"]["median_us"]
    targets = [
        _target("16 MiB p2p send/recv_into (buffer posted in a window) bandwidth vs raw shm copy",
                r["bw16_p2p_into_window_over_shm_copy"], ">=", 0.8),
        _target("16 MiB p2p one-sided put bandwidth vs raw shm copy", r["bw16_put_over_shm_copy"], ">=", 0.5),
        _target("64 B p2p round trip vs raw zmq.asyncio ipc", r["rtt64_p2p_over_zmq_asyncio"], "<=", 1.0),
        _target("16 MiB p2p transfer speed-up vs grpc.aio stream", r["transfer16_grpc_over_p2p"], ">=", 5.0),
    ]
    if "fidelity" in res:
        targets.append(_target("fabric fidelity median relative error", res["fidelity"]["rel_error_median"],
                               "<=", 0.05))
    if "fidelity_under_load" in res:
        targets.append(_target("fabric fidelity median relative error while the pod serves a closed loop",
                               res["fidelity_under_load"]["rel_error_median"], "<=", 0.05))
    return r, targets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke test, numbers are noisy)")
    p.add_argument("--under-load", metavar="READY_FILE", default=None,
                   help="also measure fabric fidelity while the pod of this ready file (xds up --ready-file) "
                        "serves a closed loop of --load-concurrency streams")
    p.add_argument("--load-concurrency", type=int, default=16, metavar="N",
                   help="streams in flight for --under-load (default 16)")


def run(args: argparse.Namespace) -> int:
    import uvloop

    plan = BenchPlan.quick() if args.quick else BenchPlan()
    if args.load_concurrency < 1:
        print("xds bench xccl: --load-concurrency must be >= 1", file=sys.stderr)
        return 2
    if args.under_load is not None and not os.path.isfile(args.under_load):
        print(f"xds bench xccl: --under-load {args.under_load}: no such ready file (xds up --ready-file)",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xds-bench-xccl-") as work:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            res = runner.run(_bench_all(plan, work))
            if args.under_load is not None:
                res["fidelity_under_load"] = runner.run(
                    fidelity_under_load(args.under_load, args.load_concurrency, plan, work))
    res["ratios"], res["targets"] = _ratios(res)
    res["elapsed_s"] = time.monotonic() - t0
    if args.json:
        print(json.dumps(res, indent=1, sort_keys=True))
    else:
        for t in res["targets"]:
            print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {t['value']:.3f} (target {t['op']} {t['threshold']})")
    return 0
