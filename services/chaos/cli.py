"""`xds chaos run SCENARIO.yaml (--ready-file READY.json | --compose PROJECT) [--report DIR] [--json]`.

``--ready-file``: a pod started by `xds up` (faults act on its processes); ``--compose``: a
Docker Compose project (faults act on its containers: ``services.chaos.containers``).

Exit codes: 0 PASS, 1 FAIL (the report says which checks), 2 the experiment could not run
(bad scenario, pod not there or not ready, a fault kind the pod does not support).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments_lazy(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    sub = parser.add_subparsers(dest="chaos_command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run one scenario against a pod (`xds up` or Docker Compose)",
                       description="run one scenario against a pod started by `xds up` (--ready-file) "
                                   "or by `docker compose up` (--compose)")
    p.add_argument("scenario", help="scenario YAML (see examples/chaos/)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ready-file", help="the ready file `xds up --ready-file` wrote")
    where.add_argument("--compose", metavar="PROJECT",
                       help="a Docker Compose project (COMPOSE_PROJECT_NAME / -p) running the pod: faults act "
                            "on its containers (crash: SIGKILL of the main process, hang: docker pause)")
    p.add_argument("--report", default=None, help="directory for report.json and timeline.png")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from services.common.logging import configure_logging

    # Before any module asks for a logger: the pod's liveness changes are the report's, not stderr's.
    configure_logging("chaos", level=os.environ.get("XDS_LOG_LEVEL", "warning"))
    import uvloop

    from services.chaos import faults
    from services.chaos.report import NoPicture, write
    from services.chaos.containers import ComposeNotReady, ComposePod, DockerError
    from services.chaos.runner import Experiment, PodHandle, PodNotReady
    from services.chaos.scenario import load_scenario
    from services.common.config import ConfigError

    try:
        scenario = load_scenario(args.scenario)
        pod = ComposePod.open(args.compose) if args.compose else PodHandle.open(args.ready_file)
        exp = Experiment(scenario, pod)
        exp.preflight()
        exp.expected = exp.reference()
        uvloop.run(exp.run())
    except (ConfigError, PodNotReady, ComposeNotReady, DockerError, faults.FaultNotSupported) as exc:
        print(f"xds chaos: {exc}", file=sys.stderr)
        return 2
    report = exp.result()
    if args.report:
        try:
            j, png = write(report, Path(args.report))
            print(f"xds chaos: report in {j} and {png}", file=sys.stderr)
        except NoPicture as exc:
            print(f"xds chaos: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['scenario']}: {report['verdict']}")
        for f in report["faults"]:
            print(f"  {f['label']}: {'verified' if f['verified'] else 'NOT VERIFIED'}, recovery {f['recovery']['recovery_s']} s")
        for c in report["failed_checks"]:
            print(f"  FAILED: {c}")
    return 0 if report["verdict"] == "PASS" else 1
