"""`xds generate --endpoint HOST:PORT [--endpoint ...]`: generate through the pod's routers.

Same sampling flags and the same ``--json`` output as ``xds generate --reference``, so the two
can be compared directly (same --request-id -> same tokens).
"""

from __future__ import annotations

import argparse
import json
import sys

from services.client.errors import XdsClientError
from services.client.sync import SyncInferenceClient
from services.model.cli_generate import add_sampling_arguments

HELP = "generate text through the pod's routers (gRPC)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", action="append", required=True, metavar="HOST:PORT",
                        help="a router's gRPC address; repeat for fail-over (tried in order)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline for the whole request")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, request_id=args.request_id)
    try:
        with SyncInferenceClient(args.endpoint, timeout_s=args.timeout_s) as client:
            if args.json:
                print(json.dumps(client.complete(args.prompt, **kw).to_json()))
                return 0
            n, finish = 0, ""
            for d in client.generate(args.prompt, **kw):
                sys.stdout.write(d.text)
                sys.stdout.flush()
                n += len(d.token_ids)
                finish = d.finish_reason
            print()
            print(f"[{n} tokens, finish_reason={finish}]", file=sys.stderr)
    except XdsClientError as exc:
        print(f"xds generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.client.cli", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
