"""`xds` command line: one table of subcommands, each a module with add_arguments/run.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``. Only the
chosen command's module is imported: `xds --help` stays fast, and one command's import
problem cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping

# name -> (module, one-line help). Keep sorted; one line per command.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("services.bench.cli", "run a benchmark and print its results (JSON with --json)"),
    "chaos": ("services.chaos.cli", "run a chaos experiment (scenario file) against a running pod"),
    "compose": ("services.pod.compose", "print the pod's Docker Compose file, generated from its spec"),
    "fabric-sim": ("fabric_sim.cli", "run the fabric simulator process"),
    "generate": ("services.model.cli_generate", "generate text with the reference engine or a running pod"),
    "model": ("services.model.cli_model", "create model directories with deterministic random weights"),
    "up": ("services.pod.cli", "start the whole pod as local processes; Ctrl-C stops it"),
}


def add_lazy_subcommands(parser: argparse.ArgumentParser, table: Mapping[str, tuple[str, str]],
                         argv: list[str], dest: str) -> None:
    """Register every name of ``table``; import and populate only the one named in ``argv``."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (modname, help_text) in table.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(modname)
            nested = getattr(mod, "add_arguments_lazy", None)  # commands with their own table
            if nested is not None:
                nested(p, argv[argv.index(name) + 1:])
            else:
                mod.add_arguments(p)
            p.set_defaults(**{f"_run_{dest}": mod.run})


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xds", description="xdeepserve: disaggregated MoE serving emulator")
    add_lazy_subcommands(parser, COMMANDS, argv, "command")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run_command(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
