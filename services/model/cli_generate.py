"""`xds generate`: text from the reference engine (``--reference``) or a running pod (``--endpoint``)."""

from __future__ import annotations

import argparse
import json
import sys

from services.common.config import ConfigError
from services.model.engine import GenerationRequest, InvalidRequest, ReferenceEngine, prompt_ids
from services.model.sampling import InvalidSamplingParams, SamplingParams
from services.model.weights import WeightsError



def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: derived from request id)")
    p.add_argument("--request-id", default=None,
                   help="idempotency key; unseeded sampling draws from it (default: reference 'xds-cli-0', "
                        "pod: a fresh id per call, so concurrent calls never attach to each other)")
    p.add_argument("--json", action="store_true", help="print {token_ids, text, finish_reason}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--reference", action="store_true",
                      help="run the monolithic reference engine in this process (needs --preset or --model)")
    mode.add_argument("--endpoint", action="append", metavar="HOST:PORT",
                      help="a running pod's router (gRPC); repeat for fail-over, tried in order")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", help="built-in model preset (weights from --model-seed)")
    src.add_argument("--model", help="model directory (config.json + *.safetensors)")
    parser.add_argument("--model-seed", type=int, default=0, help="weight seed for --preset")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="with --endpoint: deadline of the request")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.endpoint:
        from services.client.cli import run as run_through_pod
        return run_through_pod(args)
    if not (args.preset or args.model):
        print("xds generate: error: --reference needs --preset NAME or --model DIR", file=sys.stderr)
        return 2
    try:
        engine = (ReferenceEngine.from_preset(args.preset, args.model_seed) if args.preset
                  else ReferenceEngine.from_dir(args.model))
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed, max_tokens=args.max_tokens)
        req = GenerationRequest(args.request_id or "xds-cli-0", prompt_ids(args.prompt), params)
        res = engine.generate([req])[0]
    except (ConfigError, WeightsError, InvalidRequest, InvalidSamplingParams) as exc:
        print(f"xds generate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.text)
        print(f"[{len(res.token_ids)} tokens, finish_reason={res.finish_reason}]", file=sys.stderr)
    return 0
