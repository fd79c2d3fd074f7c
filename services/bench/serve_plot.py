"""`xds bench serve --plot DIR`: PNGs drawn with matplotlib (the ``chaos`` extra).

- ``latency_distributions.png``: TTFT and TPOT histograms, one series per request rate;
- ``over_time.png``: output tokens/s and per-request TTFT / E2EL against time since the
  run's start, one series per rate;
- ``sweep.png`` (two or more rates): output throughput against TTFT and TPOT (p50 and the
  highest percentile asked for), one point per rate, labelled with the rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'xdeepserve[chaos]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(out_dir: str | Path, runs: list[dict[str, Any]], title: str) -> list[str]:
    """``runs``: per rate ``{"label", "ttft_ms": [...], "tpot_ms": [...], "timeline": {...},
    "summary": {...}}``. Returns the files written."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [_distributions(plt, out, runs, title), _over_time(plt, out, runs, title)]
    if len(runs) > 1:
        files.append(_sweep(plt, out, runs, title))
    return [str(f) for f in files]


def _edges(xs: list[float], n: int) -> list[float]:
    """The same bins for every rate, so the bars compare."""
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _distributions(plt: Any, out: Path, runs: list[dict], title: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        every = [x for run in runs for x in run[key]]
        edges = _edges(every, min(40, max(8, len(every) // 3)))
        for run in runs:
            if run[key]:
                ax.hist(run[key], bins=edges, alpha=0.55, label=f"rate {run['label']}")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("requests")
        ax.set_title(f"{name} distribution")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "latency_distributions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _over_time(plt: Any, out: Path, runs: list[dict], title: str) -> Path:
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for run in runs:
        tl = run["timeline"]
        line, = ax1.plot(tl["bin_s"], tl["tokens_per_s"], marker=".", label=f"rate {run['label']}")
        ax2.plot(tl["finish_s"], tl["e2el_ms"], ".", color=line.get_color(), alpha=0.7,
                 label=f"E2EL, rate {run['label']}")
        ax2.plot(tl["finish_s"], tl["ttft_ms"], "x", color=line.get_color(), alpha=0.7, markersize=4,
                 label=f"TTFT, rate {run['label']}")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("output throughput over time (1 s bins)")
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("seconds since the run's start (request finish time)")
    ax2.set_title("per-request latency over time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep(plt: Any, out: Path, runs: list[dict], title: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r["summary"]["output_tokens_per_s"] for r in runs]
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        pcts = [k for k in runs[0]["summary"][key] if k.startswith("p")]
        for stat in dict.fromkeys(["median", pcts[-1] if pcts else "mean"]):
            ys = [r["summary"][key][stat] for r in runs]
            ax.plot(xs, ys, marker="o", label=f"{name} {'p50' if stat == 'median' else stat}")
        for x, r in zip(xs, runs):
            ax.annotate(f"rate {r['label']}", (x, r["summary"][key]["median"]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7)
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"throughput vs {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
