"""`xds bench straggler`: TPOT with a straggler expert, without it, and with replica choice off.

In one run (each pod warmed up first, unmeasured): a pod with replica choice on (pod spec ``experts.replica_choice``) serves the same
greedy load twice, without and then with one expert instance slowed by ``--delay-ms`` per block
(the admin call ``SetStraggler``, read back before and after); then a pod with replica choice
off serves it with the same straggler (and once without, its own baseline). Prints TPOT p50/p99
of each and the ratios against the same-run baseline (choice on, no straggler). Greedy streams
of every phase must be identical token for token (the choice changes timing only): the JSON
counts those that differ, and the exit code is 1 if any differs or errs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

HELP = "TPOT with a straggler expert, without it, and with replica choice off (one run, two pods)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset of the pods the bench starts")
    p.add_argument("--expert", default="expert-1", help="the expert instance to slow")
    p.add_argument("--delay-ms", type=float, default=20.0, help="straggler delay per dispatched block")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _serve_args(args: argparse.Namespace, endpoints: list[str]) -> argparse.Namespace:
    return argparse.Namespace(endpoint=endpoints, concurrency=args.concurrency, request_rate=0.0, temperature=0.0,
                              max_tokens=args.max_tokens, seed=args.seed, timeout_s=300.0)


async def _phases(pod, args: argparse.Namespace, prompts: list[str], straggle: list[bool]) -> list[tuple[dict, list]]:
    from services.bench.serve import run_pod, summarize
    from services.common.admin import get_straggler, set_straggler

    # Warm-up (not measured): first requests pay connection set-up and first-touch costs.
    await run_pod(_serve_args(args, pod.routers), prompts[:args.concurrency])
    out = []
    for slow in straggle:
        if slow:
            state = await set_straggler(pod.spec, args.expert, args.delay_ms)
            if state.delay_ms != args.delay_ms:
                raise RuntimeError(f"{args.expert} reads back a delay of {state.delay_ms} ms, not {args.delay_ms}")
        try:
            records, duration = await run_pod(_serve_args(args, pod.routers), prompts)
        finally:
            if slow:
                after = await get_straggler(pod.spec, args.expert)
                await set_straggler(pod.spec, args.expert, 0)
        summary = summarize(records, duration)
        if slow:
            summary["straggler"] = {"service": args.expert, "delay_ms": args.delay_ms,
                                    "blocks_delayed": after.delayed - state.delayed}
        out.append((summary, [r.token_ids for r in records]))
    return out


def _pod(args: argparse.Namespace, choice: bool):
    from services.pod.launcher import Pod
    from services.pod.spec import pod_from_mapping

    root = Path(tempfile.mkdtemp(prefix="xstrag-", dir="/tmp"))   # ipc paths must stay short
    spec = pod_from_mapping({"name": f"strag{uuid.uuid4().hex[:6]}", "run_dir": str(root / "run"),
                             "model": {"preset": args.preset},
                             "experts": {"instances": 4, "replicas": 2, "replica_choice": choice}})
    return Pod(spec), root


def _run_pod(args: argparse.Namespace, prompts: list[str], choice: bool, straggle: list[bool]):
    pod, root = _pod(args, choice)
    try:
        pod.start()
        return asyncio.run(_phases(pod, args, prompts, straggle))
    finally:
        pod.stop()
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from services.bench.serve import make_prompts

    prompts = make_prompts(args.num_prompts, args.prompt_len, args.seed)
    (base, base_tok), (slow, slow_tok) = _run_pod(args, prompts, True, [False, True])
    (off_base, off_base_tok), (off, off_tok) = _run_pod(args, prompts, False, [False, True])
    differ = sum(t != b for toks in (slow_tok, off_base_tok, off_tok) for t, b in zip(toks, base_tok))

    def p50(s: dict) -> float:
        return s["tpot_ms"]["p50"]

    result = {
        "bench": "straggler", "preset": args.preset, "num_prompts": args.num_prompts,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "choice_on": {"no_straggler": base, "straggler": slow},
        "choice_off": {"no_straggler": off_base, "straggler": off},
        "tpot_p50_ms": {"no_straggler": p50(base), "straggler_choice_on": p50(slow),
                        "straggler_choice_off": p50(off), "no_straggler_choice_off": p50(off_base)},
        "ratios": {"straggler_choice_on_over_baseline": p50(slow) / p50(base),
                   "straggler_choice_off_over_baseline": p50(off) / p50(base),
                   "straggler_choice_off_over_choice_on": p50(off) / p50(slow),
                   "no_straggler_choice_off_over_baseline": p50(off_base) / p50(base),
                   # What the straggler costs each pod against its own no-straggler phase.
                   "choice_on_straggler_over_no_straggler": p50(slow) / p50(base),
                   "choice_off_straggler_over_no_straggler": p50(off) / p50(off_base)},
        "streams_differing_from_baseline": differ,
    }
    errors = sum(s["errors"] for s in (base, slow, off_base, off))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        t = result["tpot_p50_ms"]
        print(f"TPOT p50: no straggler {t['no_straggler']:.1f} ms, straggler with choice {t['straggler_choice_on']:.1f} "
              f"ms, straggler without choice {t['straggler_choice_off']:.1f} ms")
    if errors or differ:
        print(f"bench straggler: {errors} errors, {differ} streams differing (see JSON)", file=sys.stderr)
        return 1
    return 0
