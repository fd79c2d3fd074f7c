import pytest

from services.bench.depth import depths, ttft_by_depth


def test_depth_counts_the_requests_ahead_still_waiting_for_their_first_token() -> None:
    spans = [(0.0, 1.0), (0.0, 2.0), (0.5, 0.6), (1.5, 3.0), (2.5, 2.6)]
    assert depths(spans) == [0, 1, 2, 1, 1]


def test_buckets_report_ttft_by_depth() -> None:
    spans = [(0.0, 0.1)] + [(1.0, 1.0 + 0.1 * (i + 1)) for i in range(20)]
    rows = ttft_by_depth(spans)
    assert [r["depth"] for r in rows] == ["0", "1-3", "4-15", "16-63"]
    assert sum(r["requests"] for r in rows) == 21
    assert rows[0]["ttft_ms_p50"] == pytest.approx(100.0) and rows[0]["requests"] == 2
    assert rows[-1]["ttft_ms_p50"] > rows[1]["ttft_ms_p50"]     # deeper waits longer here
