"""`xds bench KIND`: benchmarks that print JSON with ratios against same-run baselines."""

from __future__ import annotations

import argparse

from services.cli import add_lazy_subcommands

# kind -> (module with add_arguments(parser) and run(args) -> int, one-line help).
KINDS: dict[str, tuple[str, str]] = {
    "fabric": ("fabric_sim.bench", "fabric simulator: reserve round trip vs raw zmq, pipelining, fidelity"),
    "http": ("services.bench.http", "OpenAI HTTP vs gRPC on the same router: added latency per streamed token"),
    "idle": ("services.bench.idle", "CPU and wake-ups of an idle pod started by `xds up`, vs a bare-uvloop floor"),
    "kvpool": ("services.kvpool.bench", "KV pool store/load/fetch vs a same-run pack+memcpy baseline"),
    "reference": ("services.bench.reference", "reference-engine prefill/decode throughput"),
    "soak": ("services.bench.soak", "constant load for --duration against xds up: errors, exactness, RSS/fd/shm growth"),
    "serve": ("services.bench.serve", "load a running pod: throughput, TTFT, TPOT, ITL; --compare-reference"),
    "straggler": ("services.bench.straggler", "TPOT with a straggler expert, without it, and with replica choice off"),
    "xccl": ("services.bench.xccl", "XCCL p2p, dispatch/combine and fabric fidelity vs raw baselines"),
}


def add_arguments_lazy(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    add_lazy_subcommands(parser, KINDS, argv, "kind")


def run(args: argparse.Namespace) -> int:
    return int(args._run_kind(args) or 0)
