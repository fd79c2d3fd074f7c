"""`xds bench serve`'s pure parts: arrival schedules, metrics and goodput (no sockets)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from services.bench import serve_core as core


def rec(i: int, start: float, times: list[float], tokens: list[int] | None = None, error: str = "") -> core.Record:
    r = core.Record(i, f"r{i}", prompt_tokens=10, start=start, error=error)
    for t, n in zip(times, tokens or [1] * len(times)):
        r.add_chunk(t, n)
    return r


def test_rates_percentiles_and_slos_parse_or_say_what_is_wrong() -> None:
    assert core.parse_rates("2, 8,inf") == [2.0, 8.0, math.inf]
    assert core.parse_rates("0") == [math.inf]       # the old "all at once"
    for bad in ("", "fast", "-1", "nan"):
        with pytest.raises(core.BenchArgError, match="--request-rate"):
            core.parse_rates(bad)
    assert core.parse_percentiles("50,90,99.9") == [50, 90, 99.9]
    with pytest.raises(core.BenchArgError, match="--percentiles"):
        core.parse_percentiles("0,50")
    assert core.parse_goodput(["ttft:200", "tpot:50", "e2el:1000"]) == {"ttft": 200, "tpot": 50, "e2el": 1000}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["tpot:0"]):
        with pytest.raises(core.BenchArgError, match="--goodput"):
            core.parse_goodput(bad)


def test_poisson_and_gamma_arrivals_have_the_requested_mean_and_burstiness() -> None:
    n = 20000
    for burstiness in (1.0, 0.25, 4.0):
        gaps = core.arrival_gaps(5.0, burstiness, random.Random(1))
        xs = [next(gaps) for _ in range(n)]
        mean = statistics.fmean(xs)
        assert mean == pytest.approx(0.2, rel=0.05)
        # Gamma(k, θ): coefficient of variation 1/sqrt(k): burstier below 1, more regular above.
        assert statistics.pstdev(xs) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)
    assert core.arrival_times(math.inf, 1.0, 0, num=4) == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(core.BenchArgError, match="burstiness"):
        next(core.arrival_gaps(1.0, 0.0, random.Random(0)))


def test_arrival_times_stop_at_the_count_or_the_duration_and_repeat_with_the_seed() -> None:
    a = core.arrival_times(10.0, 1.0, 7, num=50)
    assert len(a) == 50 and a[0] == 0.0 and a == sorted(a)
    assert a == core.arrival_times(10.0, 1.0, 7, num=50) != core.arrival_times(10.0, 1.0, 8, num=50)
    d = core.arrival_times(10.0, 1.0, 7, duration_s=30.0)
    assert all(t < 30.0 for t in d) and 240 < len(d) < 360   # ~300 expected
    with pytest.raises(core.BenchArgError):
        core.arrival_times(10.0, 1.0, 7, num=5, duration_s=1.0)
    with pytest.raises(core.BenchArgError):
        core.arrival_times(math.inf, 1.0, 7, duration_s=1.0)


def test_record_latencies_follow_vllms_definitions() -> None:
    r = rec(0, 10.0, [10.1, 10.2, 10.5], [1, 2, 1])     # 4 tokens in 3 chunks
    assert r.ttft_ms == pytest.approx(100) and r.e2el_ms == pytest.approx(500)
    assert r.tpot_ms == pytest.approx(400 / 3)          # (E2EL - TTFT) / (tokens - 1)
    assert r.itl_ms == pytest.approx([100, 300])
    r.usage_tokens = 5                                   # the server's count wins
    assert r.output_tokens == 5 and r.tpot_ms == pytest.approx(100)
    assert rec(1, 0.0, [0.2]).tpot_ms == 0.0             # one token: no TPOT


def test_summary_counts_errors_and_applies_every_percentile_to_every_metric() -> None:
    recs = [rec(i, 0.0, [0.1 * (i + 1), 0.1 * (i + 1) + 0.05]) for i in range(10)]
    recs.append(rec(10, 0.0, [], error="Unavailable: gone"))
    s = core.summarize(recs, 2.0, [50, 90])
    assert s["completed"] == 10 and s["errors"] == 1 and s["error_samples"] == ["Unavailable: gone"]
    assert s["output_tokens"] == 20 and s["output_tokens_per_s"] == 10 and s["request_throughput"] == 5
    assert s["input_tokens"] == 100 and s["total_tokens_per_s"] == 60
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(s[key]) == {"mean", "median", "std", "p50", "p90"}
    assert s["ttft_ms"]["median"] == pytest.approx(550) and s["ttft_ms"]["p90"] == pytest.approx(910)
    assert s["tpot_ms"]["mean"] == pytest.approx(50) and s["e2el_ms"]["p50"] == pytest.approx(600)
    assert "goodput" not in s
    empty = core.summarize([], 1.0)
    assert empty["completed"] == 0 and math.isnan(empty["ttft_ms"]["p99"])


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    recs = [rec(0, 0.0, [0.1, 0.2]),        # TTFT 100, TPOT 100, E2EL 200: meets all
            rec(1, 0.0, [0.3, 0.35]),       # TTFT 300: misses ttft
            rec(2, 0.0, [0.1, 0.5]),        # TPOT 400: misses tpot
            rec(3, 0.0, [0.05, 0.1, 0.15]),  # meets all
            rec(4, 0.0, [], error="x")]     # failed: never good
    s = core.summarize(recs, 4.0, [50], {"ttft": 200, "tpot": 150})
    assert s["goodput"] == {"slo_ms": {"ttft": 200, "tpot": 150}, "good_requests": 2, "request_goodput": 0.5}
    s = core.summarize(recs, 4.0, [50], {"e2el": 150})
    assert s["goodput"]["good_requests"] == 1   # only request 3 ends within 150 ms


def test_timeline_bins_tokens_per_second_and_orders_finishes() -> None:
    recs = [rec(0, 100.0, [100.5, 101.5, 102.5], [2, 1, 1]), rec(1, 100.2, [100.4, 100.6])]
    tl = core.timeline(recs, 100.0, 1.0)
    assert tl["tokens_per_s"] == pytest.approx([4, 1, 2]) and tl["bin_s"] == pytest.approx([0.5, 1.5, 2.25])  # last: 0.5 s
    assert tl["finish_s"] == pytest.approx([0.6, 2.5]) and tl["ttft_ms"] == pytest.approx([200, 500])


def test_mismatches_compare_completed_streams_with_the_reference_by_prompt_index() -> None:
    a = rec(0, 0.0, [1.0])
    a.token_ids = [5, 6]
    b = rec(1, 0.0, [1.0])
    b.token_ids = [7]
    failed = rec(2, 0.0, [], error="x")
    assert core.mismatches([a, b, failed], [(5, 6), (8,), (9,)]) == ["r1"]
