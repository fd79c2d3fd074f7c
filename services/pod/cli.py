"""`xds up`: the whole pod as local processes (no Docker needed)."""

from __future__ import annotations

import argparse

from services.pod.launcher import up
from services.pod.spec import load_pod


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pod", default=None, help="pod spec YAML (default: the built-in default pod)")
    p.add_argument("--ready-file", default=None, help="write router endpoints etc. as JSON here once ready")


def run(args: argparse.Namespace) -> int:
    return up(load_pod(args.pod), args.ready_file)
