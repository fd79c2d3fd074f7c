"""`python -m fabric_sim.bench [--json]`: cost and fidelity of fabric reservations.

Starts a real simulator, then measures in the same run:
- ``baseline``: a blocking pyzmq DEALER doing reserve round trips (the floor for one hop);
- ``client_seq``: ``FabricClient.reserve`` one at a time (asyncio + uvloop), ratio to baseline;
- ``client_pipelined``: many reservations in flight, reservations per second;
- ``fidelity``: reserve + ``wait_until`` for transfers of known model delay; how far the
  observed delivery lands from its target, |measured - target| / target, per time_scale.
Numbers are host-dependent: compare the ratios, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import zmq

HELP = "fabric simulator: reserve round-trip cost vs raw zmq, pipelining, timing fidelity"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2000, help="round trips per measurement")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")


def _baseline(address: str, n: int) -> list[float]:
    from fabric_sim.protocol import Reserve
    from services.common.wire import encode
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    frames = encode(Reserve(1, 0, 1, 0, "ub"))
    out = []
    try:
        for _ in range(50):
            sock.send_multipart(frames)
            sock.recv_multipart()
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send_multipart(frames)
            sock.recv_multipart()
            out.append(time.perf_counter() - t0)
    finally:
        sock.close(linger=0)
    return out


async def _client(address: str, n: int, scale: float) -> dict:
    from xccl_net.fabric_client import FabricClient
    # A generous deadline: a measurement must not silently go unmodelled on a slow answer.
    c = await FabricClient.connect(address, name="bench", npu=0, deadline_s=5.0)
    try:
        for _ in range(50):
            await c.reserve(1, 0)
        seq = []
        for _ in range(n):
            t0 = time.perf_counter()
            await c.reserve(1, 0)
            seq.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(max(1, n // 64)):
            await asyncio.gather(*(c.reserve(1 + i % 7, 0) for i in range(64)))
        piped = (n // 64 * 64) / (time.perf_counter() - t0)
        # Fidelity: 1 kB same-server transfers, far apart so links are idle; target = the delay.
        errors, lates, e2e = [], [], []
        for _ in range(min(n, 200)):
            t_start = time.monotonic()
            delay = await c.reserve(1, 1000)
            deliver_at = time.monotonic() + delay
            await c.wait_until(deliver_at)
            late = time.monotonic() - deliver_at
            lates.append(late)
            errors.append(late / delay if delay > 0 else 0.0)
            # End to end, the reservation round trip itself is on top of the emulated delay.
            e2e.append((time.monotonic() - t_start) / delay - 1 if delay > 0 else 0.0)
        c.report_fidelity()
        return {"seq": seq, "pipelined_per_s": piped, "rel_err": errors, "e2e": e2e, "late": lates,
                "target_s": delay, "stats": c.stats}
    finally:
        await c.close()


def _q(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]


def run(args: argparse.Namespace) -> int:
    import uvloop

    from fabric_sim.launch import start_sim
    result: dict = {"bench": "fabric", "n": args.n, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="xfb", dir="/tmp") as d:
        for scale in (1.0, 100.0, 1000.0):
            sim = start_sim(Path(d) / f"s{int(scale)}", {"servers": 2, "npus_per_server": 8, "time_scale": scale,
                                                       "data_address": f"ipc://{d}/s{int(scale)}.sock"})
            try:
                base = _baseline(sim.data_address, args.n)
                r = uvloop.run(_client(sim.data_address, args.n, scale))
            finally:
                sim.stop()
            b_med, c_med = statistics.median(base), statistics.median(r["seq"])
            result["runs"][f"time_scale={scale:g}"] = {
                "baseline_sync_rtt_us_median": round(b_med * 1e6, 1),
                "client_rtt_us_median": round(c_med * 1e6, 1),
                "client_rtt_us_p99": round(_q(r["seq"], 99) * 1e6, 1),
                "client_over_baseline_ratio": round(c_med / b_med, 2),
                "pipelined_reserves_per_s": round(r["pipelined_per_s"]),
                "fidelity_target_delay_us": round(r["target_s"] * 1e6, 2),
                "fidelity_late_us_median": round(statistics.median(r["late"]) * 1e6, 1),
                "fidelity_late_us_p99": round(_q(r["late"], 99) * 1e6, 1),
                "fidelity_rel_err_median": round(statistics.median(r["rel_err"]), 4),
                "fidelity_rel_err_p99": round(_q(r["rel_err"], 99), 4),
                "fidelity_e2e_rel_err_median": round(statistics.median(r["e2e"]), 4),
                "early_deliveries": sum(1 for x in r["late"] if x < 0),
            }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m fabric_sim.bench", description=HELP)
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
