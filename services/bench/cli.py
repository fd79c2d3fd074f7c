"""`xds bench KIND`: benchmarks that print JSON with ratios against same-run baselines."""

from __future__ import annotations

import argparse
import importlib

HELP = "run a benchmark and print its results (JSON with --json)"

# kind -> module with add_arguments(parser) and run(args) -> int.
KINDS: dict[str, str] = {
    "reference": "services.bench.reference",
    "xccl": "services.bench.xccl",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, modname in KINDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name):
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)


def run(args: argparse.Namespace) -> int:  # dispatched through the kind's own _run
    return int(args._run(args) or 0)
