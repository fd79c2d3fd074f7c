"""`xds bench serve` against one real tiny pod: a two-rate sweep over gRPC with plots and the
reference check, and the same over the routers' OpenAI HTTP API (token ids returned, so the
reference check holds there too). The CLI runs as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pods import TestPod

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pod() -> Iterator[TestPod]:
    with TestPod.running("bsv", {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0}}) as p:
        yield p


def bench(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "services.cli", "bench", "serve", *args, "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 300 and 10_000 < len(data) < 2_000_000, (path, width, height, len(data))


def check_runs(res: dict, rates: list, n: int) -> None:
    assert [run["request_rate"] for run in res["runs"]] == rates
    for run in res["runs"]:
        s = run["pod"]
        assert s["completed"] == n and s["errors"] == 0
        assert s["output_tokens"] > 0 and s["output_tokens_per_s"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert {"mean", "median", "std", "p50", "p90"} <= set(s[key]) and s[key]["p90"] >= s[key]["p50"] > 0
        assert s["ttft_ms"]["p50"] <= s["e2el_ms"]["p50"]
        assert 0 <= s["goodput"]["good_requests"] <= n
        assert run["streams_differing_from_reference"] == 0 and run["pod_over_reference_tokens_per_s"] > 0
    assert res["reference"]["streams_differing_from_pod"] == 0


def test_grpc_sweep_with_plots_matches_the_reference(pod: TestPod, tmp_path: Path) -> None:
    eps = [a for r in pod.routers for a in ("--endpoint", r)]
    res = bench(*eps, "--request-rate", "4,inf", "--num-prompts", "6", "--max-concurrency", "4", "--max-tokens", "6",
                "--prompt-len", "24", "--percentiles", "50,90", "--goodput", "ttft:60000", "e2el:60000",
                "--compare-reference", "--model", pod.model_dir, "--plot", str(tmp_path / "plots"),
                "--save-result", str(tmp_path / "res.json"))
    check_runs(res, [4.0, "inf"], 6)
    # Generous SLOs: every request is good (a real check that the SLOs are applied is in the unit tests).
    assert all(run["pod"]["goodput"]["good_requests"] == 6 for run in res["runs"])
    assert json.loads((tmp_path / "res.json").read_text()) == res
    names = sorted(Path(p).name for p in res["plots"])
    assert names == ["latency_distributions.png", "over_time.png", "sweep.png"]
    for name in names:
        assert_png(tmp_path / "plots" / name)


def test_openai_backend_on_the_routers_http_api_matches_the_reference(pod: TestPod) -> None:
    res = bench("--backend", "openai", "--base-url", pod.http[0], "--request-rate", "inf", "--num-prompts", "5",
                "--max-tokens", "6", "--prompt-len", "24", "--percentiles", "50,90", "--goodput", "tpot:60000",
                "--temperature", "0.8", "--compare-reference", "--model", pod.model_dir)
    check_runs(res, ["inf"], 5)
    assert res["backend"] == "openai" and res["pod"]["output_tokens"] == res["reference"]["output_tokens"]


def test_ready_file_run_reports_cpu_per_token_and_the_step_profile(pod: TestPod, tmp_path: Path) -> None:
    """With the pod's ready file (its PIDs) and spec, the JSON says how much CPU each role spent,
    per output token against the reference's, and what one MoE layer's dispatch cost."""
    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps(pod.ready_info()))
    res = bench("--ready-file", str(ready), "--pod", str(pod.spec_file), "--num-prompts", "6",
                "--max-concurrency", "3", "--max-tokens", "8", "--prompt-len", "24", "--compare-reference",
                "--model", pod.model_dir, "--goodput", "ttft:60000")
    check_runs(res, ["inf"], 6)
    cpu = res["cpu"]
    assert cpu["cpu_s"] > 0 and cpu["cores_busy"] > 0 and cpu["cpu_ms_per_output_token"] > 0
    assert {"expert", "attention", "decode", "router", "prefill"} <= set(cpu["cpu_s_by_role"])
    assert res["reference"]["cpu_ms_per_output_token"] > 0 and res["ratios"]["pod_over_reference_cpu_per_token"] > 0
    prof = res["step_profile"]
    assert prof["attention_steps"] > 0 and prof["a2e_dispatch_ms_per_moe_layer"] > 0
    assert 0 < prof["a2e_dispatch_cpu_ms_per_moe_layer"] <= prof["a2e_dispatch_ms_per_moe_layer"] * 1.05
