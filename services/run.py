"""Entry point of every pod process: ``python -m services.run [--pod FILE] --name NAME``.

The role comes from the pod spec; each service role's module exposes ``async def serve(spec,
name)``; the fabric simulator runs from the same entry point with the config the spec derives
(``spec.fabric_config``). The spec is read from ``--pod`` (what ``xds up`` writes) or, when that
is absent, from the ``XDS_POD`` environment variable holding it as JSON (what the generated
compose.yaml sets, so one image serves every pod without baking a spec in).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import uvloop

from services.common.config import ConfigError
from services.common.heartbeat import EXIT_STALE
from services.pod.spec import PodSpec, fabric_config, load_pod, pod_from_mapping, service

POD_ENV = "XDS_POD"
ROLE_MODULES = {
    "router": "services.router.main",
    "prefill": "services.prefill.main",
    "decode": "services.decode.main",
    "attention": "services.attention.main",
    "expert": "services.expert.main",
    "kvpool": "services.kvpool.main",
}


def pod_spec(file: str | None) -> PodSpec:
    if file is not None:
        return load_pod(file)
    text = os.environ.get(POD_ENV)
    if not text:
        raise ConfigError("pod", f"give --pod FILE or set {POD_ENV} to the pod spec as JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(POD_ENV, f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(POD_ENV, "must be a JSON object (the pod spec)")
    return pod_from_mapping(data)


async def serve_fabric(spec: PodSpec) -> None:
    from fabric_sim.config import FabricConfig
    from fabric_sim.server import FabricServer
    from services.common.config import from_mapping
    from services.common.logging import configure_logging
    from services.common.runtime import ready_path

    configure_logging("fabric-sim")
    spec.run_path.mkdir(parents=True, exist_ok=True)
    await FabricServer(from_mapping(FabricConfig, fabric_config(spec)), ready_file=ready_path(spec, "fabric")).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.run")
    ap.add_argument("--pod", default=None, help=f"pod spec YAML (default: JSON in ${POD_ENV})")
    ap.add_argument("--name", required=True, help="service name in the pod (e.g. decode-0)")
    args = ap.parse_args(argv)
    try:
        spec = pod_spec(args.pod)
        role = service(spec, args.name).role
    except (ConfigError, OSError) as exc:
        print(f"services.run: {exc}", file=sys.stderr)
        return 2
    if role == "fabric":
        uvloop.run(serve_fabric(spec))
        return 0
    import importlib

    from services.common.heartbeat import StaleIncarnation

    mod = importlib.import_module(ROLE_MODULES[role])
    code = 0
    try:
        uvloop.run(mod.serve(spec, args.name))
    except* StaleIncarnation as eg:
        # Crash-only: a hung process that its peers may have declared dead ends here (after the
        # runtime closed its sockets and unlinked its segment); its supervisor starts a new one.
        print(f"services.run: {args.name}: {eg.exceptions[0]}; exiting for a new incarnation", file=sys.stderr)
        code = EXIT_STALE
    return code


if __name__ == "__main__":
    sys.exit(main())
