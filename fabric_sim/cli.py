"""`xds fabric-sim --config FILE [--ready-file PATH]`: run the fabric simulator process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "run the fabric simulator (UB/RoCE link model, fault injection, telemetry)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML FabricConfig (absent: all defaults)")
    parser.add_argument("--ready-file", type=Path,
                        help="written atomically with the bound addresses (JSON) once serving")
    parser.add_argument("--data-address", help="override data_address (e.g. ipc:///tmp/x.sock)")
    parser.add_argument("--admin-port", type=int, help="override admin_port (0 = any free port)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import uvloop

    from fabric_sim.config import FabricConfig
    from fabric_sim.server import FabricServer
    from services.common.config import ConfigError, load_yaml
    from services.common.logging import configure_logging

    log = configure_logging("fabric-sim")
    try:
        cfg = load_yaml(FabricConfig, args.config) if args.config else FabricConfig()
        over = {k: v for k, v in (("data_address", args.data_address), ("admin_port", args.admin_port))
                if v is not None}
        cfg = dataclasses.replace(cfg, **over) if over else cfg
    except (ConfigError, OSError) as exc:
        log.error("fabric.config_error", error=str(exc))
        print(f"xds fabric-sim: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        await FabricServer(cfg, ready_file=args.ready_file).run()

    uvloop.run(main())
    return 0
