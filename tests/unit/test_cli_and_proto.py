"""The `xds` CLI as a user runs it (real subprocesses), and generated-code freshness."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def xds(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=120, check=check, cwd=ROOT)


def test_generate_reference_json_is_deterministic_and_matches_a_model_dir(tmp_path) -> None:
    args = ["generate", "--reference", "--prompt", "Hello, pod", "--max-tokens", "12", "--json"]
    a = json.loads(xds(*args, "--preset", "tiny").stdout)
    b = json.loads(xds(*args, "--preset", "tiny").stdout)
    assert a == b and len(a["token_ids"]) == 12 and a["finish_reason"] == "length"
    out = json.loads(xds("model", "init", "--preset", "tiny", "--seed", "0", "--out", str(tmp_path / "m")).stdout)
    assert Path(out["model_dir"], "model.safetensors").exists()
    assert json.loads(xds(*args, "--model", str(tmp_path / "m")).stdout) == a
    seeded = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"]
    assert xds(*args, "--preset", "tiny", *seeded).stdout == xds(*args, "--preset", "tiny", *seeded).stdout


def test_generate_rejects_bad_input_with_a_clear_message() -> None:
    r = xds("generate", "--reference", "--preset", "tiny", "--prompt", "", check=False)
    assert r.returncode == 2 and "prompt is empty" in r.stderr
    r = xds("generate", "--reference", "--preset", "tiny", "--prompt", "x", "--top-p", "3", check=False)
    assert r.returncode == 2 and "top_p" in r.stderr
    r = xds("generate", "--reference", "--model", "/nonexistent", "--prompt", "x", check=False)
    assert r.returncode == 2 and "config.json" in r.stderr


def test_generated_proto_code_is_fresh(tmp_path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, timeout=120)
    committed = ROOT / "services" / "api"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "generator produced nothing"
    for rel in fresh:
        assert (committed / rel).exists(), f"{rel} not committed: run scripts/gen_proto.py"
        assert filecmp.cmp(tmp_path / rel, committed / rel, shallow=False), \
            f"services/api/{rel} is stale: run `python scripts/gen_proto.py`"


def test_logging_is_json_with_role_when_not_a_terminal() -> None:
    code = ("from services.common.logging import configure_logging, bind_request\n"
            "log = configure_logging('router', rank=1)\nbind_request('req-9')\nlog.info('shutdown.drain', n=3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    event = json.loads(r.stderr.strip().splitlines()[-1])
    assert event["event"] == "shutdown.drain" and event["role"] == "router" and event["rank"] == 1
    assert event["request_id"] == "req-9" and event["n"] == 3 and r.stdout == ""


def test_library_logging_never_writes_to_stdout() -> None:
    code = ("from services.common.heartbeat import log\nlog.info('liveness.change', peer='x')\n"
            "import json; print(json.dumps({'ok': True}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert json.loads(r.stdout) == {"ok": True} and "liveness.change" in r.stderr
