"""`xds up` as a user runs it: a service that cannot start makes it exit non-zero with that
service's error, and nothing is left behind."""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from services.common.health import probe
from services.model.cache import ensure_model
from services.model.weights import WEIGHTS_FILE
from services.pod.launcher import Pod, PodCrashLoop, PodStartError
from services.pod.spec import address, pod_from_mapping
from tests.pods import TestPod

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


# -- supervision -----------------------------------------------------------------------------
FAST = {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0}}


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, Z...), "" when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (exited, not yet reaped by its parent)."""
    return _state(pid) in ("", "Z")


def _health(pod: Pod, name: str) -> str:
    return probe(address(pod.spec, name, "health"))


def test_supervised_pod_restarts_killed_services() -> None:
    pod = TestPod.create("sup", {**FAST, "supervision": {"backoff_initial_s": 0.05}})
    try:
        pod.start().supervise()
        stopped = pod.procs["prefill-0"].pid
        assert pod.stop_one("prefill-0") == 0   # asked for: not restarted (checked below)
        for name in ("expert-1", "router-0"):
            old = pod.procs[name].pid
            assert pod.kill(name) == -signal.SIGKILL
            assert _gone(old), f"{name} pid {old} still alive after SIGKILL"
            c = pod.wait_restarted(name, old, timeout_s=60)
            assert c.proc.pid != old and pod.procs[name].pid == c.proc.pid
            assert _health(pod, name) == "SERVING"
            log = (pod.spec.run_path / f"{name}.log").read_text()
            assert f"restart 1 of {name} (pid {old} exited with code -9)" in log
        # The loop handled prefill-0's exit before it restarted the others: it stays stopped.
        assert pod.procs["prefill-0"].pid == stopped and not pod.alive("prefill-0")
        # A clean exit we did not ask for (SIGTERM from elsewhere, code 0) is restarted too.
        old = pod.procs["kvpool-0"].pid
        os.kill(old, signal.SIGTERM)
        c = pod.wait_restarted("kvpool-0", old, timeout_s=60)
        assert pod.procs["kvpool-0"].pid == c.proc.pid != old and _health(pod, "kvpool-0") == "SERVING"
        assert "restart 1 of kvpool-0 (pid %d exited with code 0)" % old in c.log_path.read_text()
        info = pod.ready_info()
        assert info["restarts"] == {"expert-1": 1, "router-0": 1, "kvpool-0": 1}
        assert info["pids"]["router-0"] == pod.procs["router-0"].pid
        assert probe(info["routers"][0]) == "SERVING"   # the ready info names the new router's port
        assert not pod.killed   # restarted: they clean up their shm at stop like everyone else
        # A hung (SIGSTOPped) service is not dead to the supervisor; stop() still ends it cleanly.
        hung = pod.procs["expert-0"].pid
        os.kill(hung, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(hung) != "T":
            assert time.monotonic() < deadline, f"expert-0 not stopped: state {_state(hung)}"
            os.sched_yield()
        pod.stop()
        assert pod.procs["expert-0"].returncode == 0 and pod.procs["expert-0"].pid == hung
        assert set(pod.restarts) == {"expert-1", "router-0", "kvpool-0"}
    finally:
        pod.stop()   # asserts no shm segment left (the restarted expert removes its own)


def _model_copy(root: Path) -> Path:
    """A model directory of this test's own (the crash-loop test damages it)."""
    src = ensure_model(None, "tiny", 0)
    dst = root / "model"
    shutil.copytree(src, dst)
    return dst


def test_a_crash_looping_service_makes_the_supervisor_give_up_with_its_log() -> None:
    pod = TestPod.create("loop", {**FAST, "supervision": {"backoff_initial_s": 0.05, "max_restarts": 2}})
    pod = TestPod(dataclasses.replace(pod.spec, model=dataclasses.replace(pod.spec.model, dir=str(_model_copy(pod.root)))),
                  pod.root)
    try:
        pod.start(only=["expert-0"]).supervise()
        (Path(pod.model_dir) / WEIGHTS_FILE).write_bytes(b"not safetensors")   # every restart fails to load
        old = pod.procs["expert-0"].pid
        pod.kill("expert-0")
        assert _gone(old)
        with pytest.raises(PodCrashLoop, match=r"(?s)service expert-0 crash-loops: 3 exits .*expert-0\.log.*not a readable safetensors file"):
            pod.wait_restarted("expert-0", old, timeout_s=90)
        assert pod.gave_up.service == "expert-0"
        assert all(c.proc.returncode not in (None, 0) for c in pod.children if c.name == "expert-0")
        assert len([c for c in pod.children if c.name == "expert-0"]) == 3   # first start + 2 restarts
        assert "expert-0" in pod.killed and pod.restarts == {}
    finally:
        pod.stop()


def _read_until(stream, needle: str, deadline: float) -> str:
    """Lines of a child's pipe until one contains ``needle`` (TimeoutError at the deadline)."""
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no line with {needle!r}; got:\n{''.join(seen)}")
            line = stream.readline()
            if not line:
                raise EOFError(f"stream ended before {needle!r}; got:\n{''.join(seen)}")
            seen.append(line)
            if needle in line:
                return line


def test_xds_up_restarts_a_killed_service_and_stops_cleanly(short_dir) -> None:
    settings = {"name": "upsup", "run_dir": str(short_dir / "run"), **FAST}
    (short_dir / "pod.yaml").write_text(yaml.safe_dump(settings))
    ready = short_dir / "ready.json"
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--pod", str(short_dir / "pod.yaml"),
                           "--ready-file", str(ready)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids: set[int] = set()
    try:
        _read_until(up.stdout, "is up", time.monotonic() + 120)
        info = json.loads(ready.read_text())
        assert info["restarts"] == {}
        pids |= set(info["pids"].values())
        old = info["pids"]["expert-2"]
        os.kill(old, signal.SIGKILL)
        line = _read_until(up.stderr, "service expert-2 restarted", time.monotonic() + 60)
        info = json.loads(ready.read_text())
        new = info["pids"]["expert-2"]
        assert _gone(old) and new != old and f"pid {new}" in line
        assert info["restarts"] == {"expert-2": 1}
        pids.add(new)
        assert probe(address(pod_from_mapping(settings), "expert-2", "health")) == "SERVING"
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    assert not ready.exists()
    ns = pod_from_mapping(settings).namespace
    assert not list(Path("/dev/shm").glob(f"xds.{ns}.*"))


def test_xds_up_exits_1_when_a_service_crash_loops(short_dir) -> None:
    model = _model_copy(short_dir)
    settings = {"name": "uploop", "run_dir": str(short_dir / "run"), "model": {"dir": str(model)},
                "experts": {"instances": 2, "replicas": 1}, "decode": {"groups": 1}, "routers": 1,
                "supervision": {"backoff_initial_s": 0.05, "max_restarts": 1}, **FAST}
    (short_dir / "pod.yaml").write_text(yaml.safe_dump(settings))
    ready = short_dir / "ready.json"
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--pod", str(short_dir / "pod.yaml"),
                           "--ready-file", str(ready)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _read_until(up.stdout, "is up", time.monotonic() + 120)
        pids = json.loads(ready.read_text())["pids"]
        (model / WEIGHTS_FILE).write_bytes(b"not safetensors")
        os.kill(pids["expert-1"], signal.SIGKILL)
        _, err = up.communicate(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 1
    assert "service expert-1 crash-loops: 2 exits" in err and "expert-1.log" in err
    assert "not a readable safetensors file" in err, err[-2000:]
    assert all(_gone(p) for p in pids.values())
    assert not ready.exists()
    assert not list(Path("/dev/shm").glob(f"xds.{pod_from_mapping(settings).namespace}.*"))


def test_a_new_pod_never_runs_the_spec_left_in_its_run_dir(short_dir) -> None:
    """`xds up --pod B` after a pod A of the same name stopped (its run dir, with A's resolved
    spec, stays for the logs): the services must read B, not A."""
    base = {"name": "again", "run_dir": str(short_dir / "run"), "cache_dir": str(short_dir / "cache")}
    first = Pod(pod_from_mapping({**base, "routing": {"max_waiting": 7}}))
    first.prepare()
    second = Pod(pod_from_mapping({**base, "routing": {"max_waiting": 9}}))
    second.prepare()
    assert second.spec.routing.max_waiting == 9
    assert yaml.safe_load(second.spec_file.read_text())["routing"]["max_waiting"] == 9
    # A Pod's own restarts keep what it resolved (ports, model dir): prepare is idempotent.
    ports = second.spec.router_ports
    second.prepare()
    assert second.spec.router_ports == ports
