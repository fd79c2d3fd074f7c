"""`xds` command line: one table of subcommands, each a module with add_arguments/run.

A subcommand module defines ``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily so that `xds --help` stays fast and one broken optional piece
does not take down the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module. Keep sorted; one line per command.
COMMANDS: dict[str, str] = {
    "bench": "services.bench.cli",
    "fabric-sim": "fabric_sim.cli",
    "generate": "services.model.cli_generate",
    "model": "services.model.cli_model",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xds", description="xdeepserve: disaggregated MoE serving emulator")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name):
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
