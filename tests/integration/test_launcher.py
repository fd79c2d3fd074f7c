"""`xds up` as a user runs it: a service that cannot start makes it exit non-zero with that
service's error, and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from services.pod.launcher import Pod, PodStartError
from services.pod.spec import pod_from_mapping

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_dir():
    d = Path(tempfile.mkdtemp(prefix="xds-", dir="/tmp"))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_failed_service_fails_the_launch_and_leaves_nothing(short_dir) -> None:
    spec = pod_from_mapping({"name": "broken", "run_dir": str(short_dir / "run"), "cache_dir": str(short_dir / "cache"),
                             "fabric": {"servers": 0}})
    pod = Pod(spec)
    with pytest.raises(PodStartError, match=r"(?s)service fabric exited .*FabricConfig.servers"):
        pod.start(timeout_s=30)
    assert all(c.proc.poll() is not None for c in pod.children)


def test_xds_up_exits_nonzero_with_the_service_error(short_dir) -> None:
    pod_file = short_dir / "pod.yaml"
    pod_file.write_text(yaml.safe_dump({"name": "broken2", "run_dir": str(short_dir / "run"),
                                        "cache_dir": str(short_dir / "cache"), "fabric": {"time_scale": -1}}))
    r = subprocess.run([sys.executable, "-m", "services.cli", "up", "--pod", str(pod_file),
                        "--ready-file", str(short_dir / "ready.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1
    assert "service fabric exited" in r.stderr and "time_scale" in r.stderr
    assert not (short_dir / "ready.json").exists()


def test_unknown_pod_setting_is_named(short_dir) -> None:
    pod_file = short_dir / "pod.yaml"
    pod_file.write_text("decode:\n  grups: 3\n")
    r = subprocess.run([sys.executable, "-m", "services.cli", "up", "--pod", str(pod_file)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0 and "decode.grups" in r.stderr
