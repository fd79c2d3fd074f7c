"""The pure parts of `xds bench serve`: arrival schedules, per-request records, metrics,
goodput and time series. No sockets, no clocks: times come in as numbers.

Definitions (vLLM's ``vllm bench serve``, so numbers compare):

- Arrivals: ``rate`` requests/s with gaps drawn from a gamma distribution of shape
  ``burstiness`` and mean ``1/rate`` (scale ``1/(rate*burstiness)``); burstiness 1 is a
  Poisson process, lower is burstier, higher is more regular. ``rate = inf``: no gaps.
- TTFT: first token - request start. E2EL: last token - request start. TPOT:
  (E2EL - TTFT) / (output tokens - 1), 0 for a one-token answer. ITL: gaps between
  consecutive chunks that carried tokens.
- Goodput (DistServe, as vLLM computes it): completed requests per second that meet every
  given SLO (``ttft``, ``tpot``, ``e2el``, in ms); a request missing any one does not count.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from services.bench.depth import ttft_by_depth

SLO_KEYS = ("ttft", "tpot", "e2el")


class BenchArgError(ValueError):
    """A benchmark option that cannot be honoured; the message says which and why."""


def parse_rates(text: str) -> list[float]:
    """``"2,8,inf"`` -> ``[2.0, 8.0, inf]``; ``0`` means inf (the old "all at once")."""
    rates = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise BenchArgError(f"--request-rate: {part!r} is not a number or 'inf'") from None
        if math.isnan(r) or r < 0:
            raise BenchArgError(f"--request-rate: {part!r} must be > 0 (or inf)")
        rates.append(math.inf if r == 0 else r)
    if not rates:
        raise BenchArgError("--request-rate: give at least one rate")
    return rates


def parse_percentiles(text: str) -> list[float]:
    try:
        ps = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise BenchArgError(f"--percentiles: {text!r} must be comma-separated numbers") from None
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise BenchArgError(f"--percentiles: {text!r} must be numbers in (0, 100]")
    return ps


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 200.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise BenchArgError(f"--goodput: {item!r} must be KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise BenchArgError(f"--goodput: {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise BenchArgError(f"--goodput: {item!r}: the SLO must be > 0 ms")
        slos[key] = ms
    return slos


def arrival_gaps(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Seconds to wait before each next request (endless; the caller stops)."""
    if not burstiness > 0:
        raise BenchArgError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, scale)


def arrival_times(rate: float, burstiness: float, seed: int, *, num: int | None = None,
                  duration_s: float | None = None) -> list[float]:
    """Offsets (s) from the start at which requests are sent: ``num`` of them, or all that
    fall before ``duration_s`` (the first is always at 0). With rate inf and a duration the
    number is open (closed loop): use ``arrival_gaps`` instead."""
    if (num is None) == (duration_s is None):
        raise BenchArgError("give exactly one of --num-prompts and --duration")
    if duration_s is not None and math.isinf(rate):
        raise BenchArgError("rate inf with --duration has no schedule: requests go as slots free up")
    out, t = [], 0.0
    for gap in arrival_gaps(rate, burstiness, random.Random(seed)):
        if num is not None and len(out) == num:
            break
        if duration_s is not None and t >= duration_s:
            break
        out.append(t)
        t += gap
    return out


@dataclass
class Record:
    """One request as the client saw it. Times are seconds on one monotonic clock;
    ``chunk_times[k]`` carried ``chunk_tokens[k]`` tokens."""

    index: int
    request_id: str
    prompt_tokens: int = 0
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)   # empty when the backend does not return them
    usage_tokens: int | None = None                       # the server's count, when it reports one
    error: str = ""

    def add_chunk(self, t: float, n_tokens: int, ids: Sequence[int] = ()) -> None:
        self.chunk_times.append(t)
        self.chunk_tokens.append(n_tokens)
        self.token_ids.extend(ids)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else sum(self.chunk_tokens)

    @property
    def ttft_ms(self) -> float:
        return (self.chunk_times[0] - self.start) * 1e3

    @property
    def e2el_ms(self) -> float:
        return (self.chunk_times[-1] - self.start) * 1e3

    @property
    def tpot_ms(self) -> float:
        n = self.output_tokens
        return (self.e2el_ms - self.ttft_ms) / (n - 1) if n > 1 else 0.0

    @property
    def itl_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _pkey(p: float) -> str:
    return f"p{p:g}"


def distribution(xs: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    out = {"mean": statistics.fmean(xs) if xs else math.nan, "median": percentile(xs, 50),
           "std": statistics.pstdev(xs) if xs else math.nan}
    out.update({_pkey(p): percentile(xs, p) for p in percentiles})
    return out


def meets(r: Record, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft_ms, "tpot": r.tpot_ms, "e2el": r.e2el_ms}
    return all(values[k] <= ms for k, ms in slos.items())


def summarize(records: Sequence[Record], duration_s: float, percentiles: Sequence[float] = (50, 90, 99),
              slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    d = duration_s if duration_s > 0 else math.nan
    out = {
        "completed": len(ok), "errors": len(records) - len(ok),
        "error_samples": [r.error or "no tokens" for r in records if not r.ok][:3],
        "duration_s": duration_s, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / d, "output_tokens_per_s": out_tokens / d,
        "total_tokens_per_s": (in_tokens + out_tokens) / d,
        "ttft_ms": distribution([r.ttft_ms for r in ok], percentiles),
        "tpot_ms": distribution([r.tpot_ms for r in ok if r.output_tokens > 1], percentiles),
        "itl_ms": distribution([x for r in ok for x in r.itl_ms], percentiles),
        "e2el_ms": distribution([r.e2el_ms for r in ok], percentiles),
    }
    # TTFT against the queue depth each request found (requests ahead still waiting for a first token).
    out["ttft_by_queue_depth"] = ttft_by_depth([(r.start, r.chunk_times[0]) for r in ok])
    if slos:
        good = sum(1 for r in ok if meets(r, slos))
        out["goodput"] = {"slo_ms": dict(slos), "good_requests": good, "request_goodput": good / d}
    return out


def timeline(records: Sequence[Record], t0: float, bin_s: float = 1.0) -> dict[str, list[float]]:
    """Output tokens/s in bins of ``bin_s`` from ``t0`` (the last bin ends at the last token and
    is divided by its own width; ``bin_s`` holds bin centres), and per completed request its finish
    time (s from ``t0``), TTFT and E2EL: what the over-time plot draws."""
    ok = [r for r in records if r.ok]
    end = max((r.chunk_times[-1] for r in ok), default=t0)
    bins = [0.0] * max(1, math.ceil((end - t0) / bin_s))
    for r in ok:
        for t, n in zip(r.chunk_times, r.chunk_tokens):
            bins[min(len(bins) - 1, int((t - t0) / bin_s))] += n
    widths = [bin_s] * len(bins)
    widths[-1] = max(end - t0 - bin_s * (len(bins) - 1), 1e-3) if ok else bin_s   # the last bin is partial
    done = sorted(ok, key=lambda r: r.chunk_times[-1])
    return {"bin_s": [bin_s * i + w / 2 for i, w in enumerate(widths)],
            "tokens_per_s": [b / w for b, w in zip(bins, widths)],
            "finish_s": [r.chunk_times[-1] - t0 for r in done], "ttft_ms": [r.ttft_ms for r in done],
            "e2el_ms": [r.e2el_ms for r in done]}


def mismatches(records: Sequence[Record], expected: Sequence[Sequence[int]]) -> list[str]:
    """Ids of completed requests whose tokens differ from ``expected[record.index]``."""
    return [r.request_id for r in records if r.ok and tuple(r.token_ids) != tuple(expected[r.index])]


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
