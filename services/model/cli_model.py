"""`xds model init`: write a model directory (config.json + model.safetensors)."""

from __future__ import annotations

import argparse
import json
import sys

from services.model.config import PRESETS, preset
from services.model.weights import init_tensors, save_model



def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="write config.json + model.safetensors for a preset")
    init.add_argument("--preset", required=True, choices=sorted(PRESETS))
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    cfg = preset(args.preset)
    d = save_model(args.out, cfg, init_tensors(cfg, args.seed))
    json.dump({"model_dir": str(d), "preset": args.preset, "seed": args.seed}, sys.stdout)
    sys.stdout.write("\n")
    return 0
