"""`python -m services.kvpool.bench --quick` runs end to end and reports ratios against its baseline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_prints_ratios_and_leaves_nothing_behind() -> None:
    before = {f for f in os.listdir("/dev/shm") if ".kvbench-" in f}
    p = subprocess.Popen([sys.executable, "-m", "services.kvpool.bench", "--quick"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
    assert p.returncode == 0, err[-2000:]
    d = json.loads(out)
    ops = {"pack_copy", "store", "store_present", "load", "fetch_prefix"}
    assert set(d["median_ms"]) == set(d["ratio_vs_pack_copy"]) == ops
    assert d["ratio_vs_pack_copy"]["pack_copy"] == 1.0 and all(v > 0 for v in d["median_ms"].values())
    assert d["bytes"] == d["blocks"] * d["block_bytes"]
    assert {f for f in os.listdir("/dev/shm") if ".kvbench-" in f} == before
