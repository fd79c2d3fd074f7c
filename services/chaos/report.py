"""The experiment's report: one JSON document (what ``--json`` prints) and a PNG timeline.

The PNG (matplotlib, the ``chaos`` extra) has three panels on one time axis: tokens/s with
every fault's active span shaded and its injection marked; TTFT of each request at its start
time; one lane per service with its liveness as the routers saw it. The title says PASS or
FAIL; a text block lists recovery per fault, errors by code, exactness and the failed checks.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.chaos.scenario import Scenario
from services.chaos.timeline import (degraded_window, errors_by_code, exactness, lanes, recovery,
                                     throughput_series, tokens_between, ttft_series, verdict)
from services.common.config import to_mapping

if TYPE_CHECKING:
    from services.chaos.runner import Experiment

STATE_COLORS = {"alive": "#2ca02c", "suspect": "#ff9f1c", "dead": "#d62728", "unknown": "#bbbbbb"}
FAULT_COLORS = ["#9467bd", "#1f77b4", "#e377c2", "#8c564b", "#17becf", "#bcbd22"]


def build(exp: Experiment) -> dict[str, Any]:
    sc: Scenario = exp.scenario
    streams = sorted(exp.streams, key=lambda s: s.index)
    t_end = max(exp.t_end, max((e.t for e in exp.watch.events), default=0.0))
    recs = exp.records
    rcv = [recovery(r, streams, exp.watch.events, stall_s=sc.stall_s, now=math.inf) for r in recs]
    tps = []
    faults = []
    for p, r, rv in zip(exp.plan.faults, recs, rcv):
        win = degraded_window(r, rv, t_end)
        tp = None if win is None else tokens_between(streams, *win) / (win[1] - win[0])
        tps.append(tp)
        faults.append({
            "index": r.index, "label": r.label, "kind": r.kind, "services": list(r.services),
            "links": list(p.links), "npus_a": list(p.npus_a), "npus_b": list(p.npus_b),
            "t_inject": _r(r.t_inject), "t_revert": _r(r.t_revert), "verified": not r.error,
            "evidence": r.evidence, "error": r.error, "recovery": rv.to_json(),
            "degraded_window": None if win is None else [_r(win[0]), _r(win[1])],
            "degraded_tokens_per_s": _r(tp)})
    errors = errors_by_code(streams)
    exact = exactness(streams, exp.expected) if exp.expected is not None else {"checked": 0, "exact": 0, "mismatched": []}
    failed = verdict(sc.checks, recs, rcv, tps, errors, exact)
    n_tokens = sum(len(s.tokens) for s in streams)
    return {
        "scenario": sc.name, "description": sc.description, "pod": exp.pod.spec.name,
        "verdict": "FAIL" if failed else "PASS", "failed_checks": failed,
        "load": {"requests": len(streams), "finished": sum(1 for s in streams if s.finish),
                 "tokens": n_tokens, "duration_s": _r(exp.t_end),
                 "tokens_per_s": _r(n_tokens / exp.t_end) if exp.t_end > 0 else None},
        "faults": faults,
        "errors_by_code": errors,
        "errors": [{"request": s.index, "code": s.error_code, "message": s.error} for s in streams if s.error_code],
        "exactness": exact,
        "checks": to_mapping(sc.checks),
        "series": {"bin_s": 0.5, "tokens_per_s": throughput_series(streams, t_end), "ttft_s": ttft_series(streams)},
        "liveness": {k: [list(x) for x in v] for k, v in lanes(exp.watch.events, exp.watch.names, t_end).items()},
        "liveness_source": "heartbeats through the pod's failure detector (routers' settings); fabric: health check",
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def write(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    j = d / "report.json"
    j.write_text(json.dumps(report, indent=2) + "\n")
    png = d / "timeline.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NoPicture(f"wrote {j}, but timeline.png needs matplotlib: pip install 'xdeepserve[chaos]'") from None
    draw(report, png)
    return j, png


class NoPicture(RuntimeError):
    """matplotlib is not installed (the ``chaos`` extra)."""


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes_ = report["liveness"]
    names = list(lanes_)
    n_text = sum(2 + len(f["evidence"]) for f in report["faults"]) + 1 + len(report["failed_checks"])
    fig = plt.figure(figsize=(12, 6.5 + 0.2 * len(names) + 0.13 * n_text))
    gs = fig.add_gridspec(4, 1, height_ratios=[2.2, 1.2, 0.3 * max(4, len(names)), 0.16 * n_text + 0.3],
                          hspace=0.5)
    ax_t, ax_f, ax_l = fig.add_subplot(gs[0]), fig.add_subplot(gs[1]), fig.add_subplot(gs[2])
    ax_txt = fig.add_subplot(gs[3])
    for ax in (ax_f, ax_l):
        ax.sharex(ax_t)
    t_end = max([b for v in lanes_.values() for _, b, _ in v] + [x for x, _ in report["series"]["tokens_per_s"]] + [1])

    xs = [x for x, _ in report["series"]["tokens_per_s"]]
    ys = [y for _, y in report["series"]["tokens_per_s"]]
    ax_t.step(xs, ys, where="post", color="#333333", lw=1.3)
    ax_t.set_ylabel("tokens/s")
    ax_t.set_title("tokens/s (0.5 s bins); dashed: fault injected, shaded: fault active, dotted: recovered",
                   fontsize=8, loc="left")
    tt = report["series"]["ttft_s"]
    ax_f.scatter([a for a, _ in tt], [b for _, b in tt], s=12, color="#1f77b4")
    ax_f.set_ylabel("TTFT (s)")
    ax_f.set_title("time to first token, by request start", fontsize=8, loc="left")
    ax_f.set_ylim(bottom=0)

    for i, f in enumerate(report["faults"]):
        if f["t_inject"] is None:
            continue
        c = FAULT_COLORS[i % len(FAULT_COLORS)]
        end = f["t_revert"] if f["t_revert"] is not None else f["t_inject"]
        rec = f["recovery"]["recovery_s"]
        for ax in (ax_t, ax_f, ax_l):
            if end > f["t_inject"]:
                ax.axvspan(f["t_inject"], end, color=c, alpha=0.18, lw=0, zorder=3)
            ax.axvline(f["t_inject"], color=c, lw=1.5, ls="--", zorder=4)
            if rec is not None:
                ax.axvline(f["t_inject"] + rec, color=c, lw=1.5, ls=":", zorder=4)
        ax_t.annotate(f["label"], (f["t_inject"], 1.0), xycoords=("data", "axes fraction"), rotation=0, fontsize=7,
                      color=c, xytext=(2, -10 - 9 * (i % 4)), textcoords="offset points")

    for row, name in enumerate(names):
        for a, b, st in lanes_[name]:
            ax_l.broken_barh([(a, max(b - a, 0.01))], (row - 0.38, 0.76), color=STATE_COLORS.get(st, "#bbbbbb"))
    ax_l.set_yticks(range(len(names)), names, fontsize=7)
    ax_l.set_ylim(len(names) - 0.5, -0.5)
    ax_l.set_xlabel("seconds since the load started")
    ax_l.set_title("liveness as the routers see it (green alive, orange suspect, red dead)", fontsize=8, loc="left")
    ax_t.set_xlim(0, t_end)
    ax_t.grid(alpha=0.3)
    ax_f.grid(alpha=0.3)

    verdict_ = report["verdict"]
    ax_t.text(0, 1.16, f"chaos: {report['scenario']} on pod {report['pod']}  -  {verdict_}",
              color="#2ca02c" if verdict_ == "PASS" else "#d62728", fontsize=13, fontweight="bold",
              transform=ax_t.transAxes)
    lines = []
    for f in report["faults"]:
        r = f["recovery"]
        state = "verified" if f["verified"] else "NOT VERIFIED"
        lines.append(f"{f['label']}: {state}; recovery {r['recovery_s']} s (progress {r['progress_s']} s, "
                     f"back {r['back_s']}); degraded {f['degraded_tokens_per_s']} tok/s")
        lines += [f"    proof: {e}" for e in f["evidence"]] + ([f"    error: {f['error']}"] if f["error"] else [])
    ex = report["exactness"]
    lines.append(f"errors by code: {report['errors_by_code'] or 'none'};  exact: {ex['exact']}/{ex['checked']} "
                 f"streams equal the reference;  load: {report['load']['tokens']} tokens, "
                 f"{report['load']['tokens_per_s']} tok/s")
    for c in report["failed_checks"]:
        lines.append(f"FAILED: {c}")
    ax_txt.axis("off")
    ax_txt.text(0, 1, "\n".join(_wrap(x) for x in lines), va="top", ha="left", fontsize=7.5, family="monospace",
                transform=ax_txt.transAxes)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _wrap(line: str, width: int = 150) -> str:
    return textwrap.fill(line, width, subsequent_indent="        ", break_on_hyphens=False)
