"""`xds bench soak`: a long run at constant concurrency against a pod started by `xds up`;
does anything leak?

``--concurrency`` closed-loop streams issue requests for ``--duration`` seconds. Every
service's RSS and open file descriptors (from /proc, by the PIDs in the ready file) are
sampled before the load, at the middle and at the end, and the pod's /dev/shm segments are
counted; once the load is over, the services' own heartbeats must show every table, batch,
KV block, staged KV and pool pin back at rest. Every completed stream is compared with the
reference engine. Prints JSON; exits 1 on an error, a stream differing from the reference,
RSS growth beyond ``--max-rss-growth`` from the middle to the end, fd or shm growth, or
counters not back at rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from services.bench.serve import make_prompts, pct

# A service's heartbeat load at rest (decode masters also: every KV block free, see ``not_at_rest``).
REST = {"router": {"running": 0, "queued": 0, "table": 0}, "decode": {"running": 0, "queued": 0},
        "attention": {"sequences": 0, "kv_blocks_used": 0},
        "prefill": {"running": 0, "queued": 0, "staged": 0, "staged_blocks": 0},
        "kvpool": {"pinned_blocks": 0, "writing_blocks": 0}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-file", required=True, help="the ready file written by `xds up --ready-file`")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth, middle to end")
    p.add_argument("--settle-s", type=float, default=60.0, help="how long counters may take to come to rest "
                   "(routers keep finished requests routing.retain_finished_s = 30 s by default)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--json", action="store_true")


def not_at_rest(spec: Any, loads: dict[str, dict[str, float]]) -> list[str]:
    """What is not back at rest in the services' latest loads (``{service: load}``), one line
    each; empty when every table, batch, KV block, staged KV and pool pin is."""
    from services.pod.spec import services

    bad = []
    for s in services(spec):
        want = dict(REST.get(s.role, {}))
        if s.role == "decode":
            want["free_kv_blocks"] = spec.decode.kv_blocks
        for k, v in want.items():
            got = loads.get(s.name, {}).get(k)
            if got != v:
                bad.append(f"{s.name}.{k} = {got}, want {v}")
    return bad


def proc_sample(pids: dict[str, int]) -> dict[str, dict[str, int]]:
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            out[name] = {"pid": pid, "rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            out[name] = {"pid": pid, "rss_kib": -1, "fds": -1}
    return out


def shm_sample(namespace: str) -> dict[str, int]:
    prefix = f"xds.{namespace}."
    files = [e for e in os.scandir("/dev/shm") if e.name.startswith(prefix)]
    return {"segments": len(files), "bytes": sum(e.stat().st_size for e in files)}


async def at_rest(spec: Any, settle_s: float) -> tuple[bool, dict[str, dict[str, float]]]:
    """Wait (bounded) for one beat per service, published after the load, that shows it at rest."""
    from services.common.heartbeat import HeartbeatSubscriber
    from services.common.liveness import DetectorConfig, FailureDetector
    from services.pod.spec import address, services

    names = {s.name: s.role for s in services(spec) if s.role in REST}
    sub = HeartbeatSubscriber([address(spec, n, "heartbeat") for n in names],
                              detector=FailureDetector(DetectorConfig(spec.heartbeat.suspect_after_s,
                                                                      spec.heartbeat.dead_after_s)))
    latest: dict[str, dict[str, float]] = {}
    changed = asyncio.Event()

    def on_beat(b: Any) -> None:
        latest[b.service] = dict(b.load)
        changed.set()
    sub._on_beat = on_beat

    def resting() -> bool:
        return not not_at_rest(spec, latest)

    task = asyncio.create_task(sub.run())
    try:
        async with asyncio.timeout(settle_s):
            while not resting():
                changed.clear()
                await changed.wait()
        return True, latest
    except TimeoutError:
        return False, latest
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def load(args: argparse.Namespace, routers: list[str], on_half: Any) -> tuple[list[dict], float]:
    from services.client.sdk import InferenceClient

    run_id = uuid.uuid4().hex[:8]
    prompts = make_prompts(4 * args.concurrency, args.prompt_len, 0)
    done: list[dict] = []
    t0 = time.monotonic()
    end = t0 + args.duration

    async def worker(w: int, client: InferenceClient) -> None:
        i = 0
        while time.monotonic() < end:
            rid, p = f"soak-{run_id}-{w}-{i}", prompts[(w + i * args.concurrency) % len(prompts)]
            kw = dict(max_tokens=args.max_tokens) if i % 2 else dict(max_tokens=args.max_tokens, temperature=0.8,
                                                                      top_p=0.95, seed=w * 100003 + i)
            rec = {"id": rid, "prompt": p, "kw": kw, "start": time.monotonic(), "error": ""}
            try:
                res = await client.complete(p, request_id=rid, **kw)
                rec["tokens"], rec["end"] = res.token_ids, time.monotonic()
            except Exception as exc:   # counted and reported
                rec["error"] = f"{type(exc).__name__}: {exc}"
            done.append(rec)
            i += 1

    async def half() -> None:
        await asyncio.sleep(args.duration / 2)   # the bench's own clock: when to sample, not a sync
        on_half()

    async with InferenceClient(routers, timeout_s=args.timeout_s) as client:
        await client.model_info()
        sampler = asyncio.create_task(half())
        await asyncio.gather(*(worker(w, client) for w in range(args.concurrency)))
        await sampler
    return done, time.monotonic() - t0


def run(args: argparse.Namespace) -> int:
    from services.model.engine import GenerationRequest, ReferenceEngine, prompt_ids
    from services.model.sampling import SamplingParams
    from services.pod.spec import load_pod

    ready = json.loads(Path(args.ready_file).read_text())
    spec = load_pod(Path(ready["run_dir"]) / "pod.yaml")

    def pids() -> dict[str, int]:
        return dict(json.loads(Path(args.ready_file).read_text())["pids"])

    samples: dict[str, Any] = {"start": {"procs": proc_sample(pids()), "shm": shm_sample(spec.namespace)}}

    def mid() -> None:
        samples["middle"] = {"procs": proc_sample(pids()), "shm": shm_sample(spec.namespace)}

    records, duration = asyncio.run(load(args, ready["routers"], mid))
    samples["end"] = {"procs": proc_sample(pids()), "shm": shm_sample(spec.namespace)}
    rested, loads = asyncio.run(at_rest(spec, args.settle_s))
    samples["rest"] = {"procs": proc_sample(pids()), "shm": shm_sample(spec.namespace)}

    ok = [r for r in records if not r["error"]]
    engine = ReferenceEngine.from_preset(spec.model.preset, seed=spec.model.seed, max_batch=args.concurrency) \
        if not spec.model.dir else ReferenceEngine.from_dir(spec.model.dir, max_batch=args.concurrency)
    want = engine.generate([GenerationRequest(r["id"], prompt_ids(r["prompt"]), SamplingParams(**r["kw"])) for r in ok])
    differ = [r["id"] for r, w in zip(ok, want) if tuple(r["tokens"]) != w.token_ids]

    growth = {}
    for name, m in samples["middle"]["procs"].items():
        e = samples["end"]["procs"].get(name, {})
        same = e.get("pid") == m["pid"] and m["rss_kib"] > 0
        growth[name] = {"rss_middle_to_end": (e["rss_kib"] / m["rss_kib"] - 1) if same else None,
                        "fds_middle_to_end": (e["fds"] - m["fds"]) if same else None,
                        "restarted": not same}
    worst = max((g["rss_middle_to_end"] for g in growth.values() if g["rss_middle_to_end"] is not None), default=0.0)
    fd_growth = max((g["fds_middle_to_end"] for g in growth.values() if g["fds_middle_to_end"] is not None), default=0)
    shm_growth = samples["rest"]["shm"]["segments"] - samples["start"]["shm"]["segments"]
    ttft = [(r["end"] - r["start"]) for r in ok]
    result = {"bench": "soak", "duration_s": duration, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
              "error_samples": [r["error"] for r in records if r["error"]][:3],
              "exact": len(ok) - len(differ), "differing_from_reference": len(differ),
              "requests_per_s": len(ok) / duration, "e2e_s": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
              "max_rss_growth_middle_to_end": worst, "max_fd_growth_middle_to_end": fd_growth,
              "shm_segment_growth": shm_growth, "counters_at_rest": rested,
              "growth": growth, "samples": samples,
              "loads_after": {n: {k: v for k, v in ld.items() if k in REST.get(n.split("-")[0], {})}
                              for n, ld in loads.items()}}
    failed = [why for why, bad in (("errors", result["errors"]), ("differing streams", differ),
                                   (f"RSS grew {worst:.1%}", worst > args.max_rss_growth),
                                   (f"fds grew by {fd_growth}", fd_growth > 0),
                                   (f"shm segments grew by {shm_growth}", shm_growth != 0),
                                   ("counters not at rest", not rested)) if bad]
    result["failed"] = failed
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{len(ok)} ok, {result['errors']} errors, {len(differ)} differing, RSS growth {worst:.1%}, "
              f"fd growth {fd_growth}, shm growth {shm_growth}, at rest: {rested}")
    if failed:
        print("bench soak: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0
