"""`xds bench kvpool`: KV pool store / load / prefix fetch against a same-run memcpy baseline.

Starts a fabric simulator and one pool node (real processes, stopped by PID), opens an XCCL
endpoint here, and times whole client operations on the KV of one sequence. The baseline is
what the bytes alone cost in this process: packing the KV into blocks plus one copy of them
(``pack_copy``). Ratios > 1 are the price of metadata RPCs, the XCCL transfer and unpacking.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HELP = "KV pool store/load/fetch vs a same-run pack+memcpy baseline"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=1024, help="sequence length")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny model, few iterations (smoke test)")


def _median_s(samples: list[float]) -> float:
    return statistics.median(samples)


async def _bench(args: argparse.Namespace, root: Path) -> dict:
    from fabric_sim.launch import start_sim
    from services.common.runtime import ready_path
    from services.kvpool.client import KVPoolClient
    from services.model.cache import ensure_model
    from services.model.config import ModelConfig
    from services.pod.spec import address, load_pod
    from xccl_net.endpoint import EndpointConfig, open_endpoint

    cfg_model = ModelConfig.load(ensure_model(None, args.preset, 0, ""))
    per_seq = -(-args.tokens // args.block_size)
    pod_file = root / "pod.yaml"
    pod_file.write_text(yaml.safe_dump({"name": "kvbench", "run_dir": str(root), "model": {"preset": args.preset},
                                        "kv_pool": {"block_size": args.block_size,
                                                    "capacity_blocks": 4 * per_seq + 4}}))
    spec = load_pod(pod_file)
    sim = start_sim(root / "fab", {"admin_port": 0, "data_address": address(spec, "fabric", "fabric")})
    with open(root / "kvpool-0.stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "services.run", "--pod", str(pod_file), "--name", "kvpool-0"],
                                stdout=subprocess.DEVNULL, stderr=err)
    ep = client = None
    try:
        deadline = time.monotonic() + 60
        while not ready_path(spec, "kvpool-0").exists():  # the ready file is the only signal: poll it
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "kvpool-0.stderr").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"kvpool-0 did not become ready (exit {proc.poll()}): {tail}")
            await asyncio.sleep(0.01)
        ep = await open_endpoint(EndpointConfig(name="prefill-0", namespace=spec.namespace, kind="shm",
                                                bell_dir=str(root)), fabric=None)
        client = KVPoolClient(spec, ep, cfg_model)
        rng = np.random.default_rng(0)
        shape = (cfg_model.num_key_value_heads, args.tokens, cfg_model.head_dim)
        kv = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
              for _ in range(cfg_model.num_hidden_layers)]
        nbytes = client.layout.block_bytes * per_seq
        sink = np.empty(nbytes // 4, np.float32)
        t: dict[str, list[float]] = {k: [] for k in ("pack_copy", "store", "store_present", "load", "fetch_prefix")}
        for i in range(args.iters):
            toks = [int(x) for x in rng.integers(0, 256, args.tokens)]
            t0 = time.perf_counter()
            np.copyto(sink, client.layout.pack(kv, args.tokens).reshape(-1))
            t1 = time.perf_counter()
            ref = await client.store(toks, kv, f"r{i}")
            t2 = time.perf_counter()
            await client.store(toks, kv, f"r{i}")
            t3 = time.perf_counter()
            out = await client.load(ref, f"r{i}")
            t4 = time.perf_counter()
            n, _ = await client.fetch_prefix(toks, f"f{i}")
            t5 = time.perf_counter()
            await client.release(f"r{i}")
            assert n == (args.tokens // args.block_size) * args.block_size and out[0][0].shape == shape
            for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                t[k].append(dt)
        base = _median_s(t["pack_copy"])
        return {"preset": args.preset, "tokens": args.tokens, "blocks": per_seq,
                "block_bytes": client.layout.block_bytes, "bytes": nbytes, "iters": args.iters,
                "median_ms": {k: round(_median_s(v) * 1e3, 3) for k, v in t.items()},
                "gbps": {k: round(nbytes / _median_s(v) / 1e9, 2) for k, v in t.items()},
                "ratio_vs_pack_copy": {k: round(_median_s(v) / base, 2) for k, v in t.items()}}
    finally:
        if client is not None:
            await client.close()
        if ep is not None:
            await ep.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        sim.stop()


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.preset, args.tokens, args.iters = "tiny", 100, 3
    root = Path(tempfile.mkdtemp(prefix="kvb", dir="/tmp"))
    try:
        print(json.dumps(asyncio.run(_bench(args, root)), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=HELP)
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
