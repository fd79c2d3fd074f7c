"""`python -m fabric_sim --config FILE [--ready-file PATH]`."""

from __future__ import annotations

import argparse
import sys

from fabric_sim.cli import HELP, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabric_sim", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
