"""Entry point of every pod service: ``python -m services.run --pod FILE --name NAME``.

The role comes from the pod spec; each role's module exposes ``async def serve(spec, name)``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from services.pod.spec import load_pod, service

ROLE_MODULES = {
    "router": "services.router.main",
    "prefill": "services.prefill.main",
    "decode": "services.decode.main",
    "attention": "services.attention.main",
    "expert": "services.expert.main",
    "kvpool": "services.kvpool.main",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.run")
    ap.add_argument("--pod", required=True, help="pod spec YAML")
    ap.add_argument("--name", required=True, help="service name in the pod (e.g. decode-0)")
    args = ap.parse_args(argv)
    spec = load_pod(args.pod)
    role = service(spec, args.name).role
    if role not in ROLE_MODULES:
        print(f"services.run: role {role!r} is not started through this entry point", file=sys.stderr)
        return 2
    import importlib

    mod = importlib.import_module(ROLE_MODULES[role])
    uvloop.run(mod.serve(spec, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
