"""Start a whole pod as local processes (``xds up``) and stop it cleanly.

Order: fabric simulator, then every service of ``spec.services`` (dependencies first). Each
service signals readiness by writing ``<run_dir>/<name>.ready``; the launcher waits on those
files with a deadline (there is no other cross-process event to wait on). A service that exits
before it is ready fails the launch with that service's stderr tail. Stopping is by PID:
SIGTERM to every child (reverse order), SIGKILL to those still alive after the grace period,
then the pod's shared-memory namespace and sockets are swept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.config import to_mapping
from services.common.runtime import ready_path, write_json_atomic
from services.model.cache import ensure_model
from services.pod.spec import COMPOSE_PORTS, PodSpec, bind_address, services

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


class PodStartError(RuntimeError):
    """A service did not become ready; the message names it and carries its stderr tail."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    ready_file: Path
    info: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


def fabric_config(spec: PodSpec) -> dict[str, Any]:
    """The simulator's config: the pod's fabric settings + addresses from the pod's rule."""
    cfg = dict(spec.fabric)
    cfg["data_address"] = bind_address(spec, "fabric", "fabric")
    if spec.addressing == "compose":
        cfg["admin_host"], cfg["admin_port"] = "0.0.0.0", COMPOSE_PORTS["fabric_admin"]
    return cfg


class Pod:
    def __init__(self, spec: PodSpec) -> None:
        self.spec = spec
        self.children: list[Child] = []
        self.spec_file = spec.run_path / "pod.yaml"

    # -- start -----------------------------------------------------------------------------
    def start(self, timeout_s: float = READY_TIMEOUT_S) -> Pod:
        run = self.spec.run_path
        run.mkdir(parents=True, exist_ok=True)
        model_dir = ensure_model(self.spec.model.dir, self.spec.model.preset, self.spec.model.seed, self.spec.cache_dir)
        resolved = to_mapping(self.spec)
        resolved["model"]["dir"] = str(model_dir)  # every service loads these very files
        self.spec_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        try:
            fab_cfg = run / "fabric.yaml"
            fab_cfg.write_text(yaml.safe_dump(fabric_config(self.spec)))
            self._spawn("fabric", [sys.executable, "-m", "fabric_sim", "--config", str(fab_cfg),
                                   "--ready-file", str(ready_path(self.spec, "fabric"))])
            self._wait_ready(self.children[-1:], timeout_s)
            rest = [s.name for s in services(self.spec) if s.role != "fabric"]
            for name in rest:
                self._spawn(name, [sys.executable, "-m", "services.run", "--pod", str(self.spec_file), "--name", name])
            self._wait_ready(self.children[1:], timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        ready = ready_path(self.spec, name)
        ready.unlink(missing_ok=True)
        log_path = self.spec.run_path / f"{name}.log"
        env = dict(os.environ, XDS_LOG_FORMAT=os.environ.get("XDS_LOG_FORMAT", "json"))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                    start_new_session=True)  # Ctrl-C at the terminal goes to us only
        self.children.append(Child(name, proc, log_path, ready))

    def _wait_ready(self, children: list[Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(children)
        while pending:
            for c in list(pending):
                if c.ready_file.exists():
                    c.info = json.loads(c.ready_file.read_text())
                    pending.remove(c)
                elif c.proc.poll() is not None:
                    raise PodStartError(f"service {c.name} exited with code {c.proc.returncode} before it was "
                                        f"ready; its log ({c.log_path}) ends with:\n{c.log_tail()}")
            if pending and time.monotonic() > deadline:
                c = pending[0]
                raise PodStartError(f"service {c.name} not ready after {timeout_s:g}s; log ends with:\n{c.log_tail()}")
            if pending:
                time.sleep(0.02)

    # -- facts -----------------------------------------------------------------------------
    @property
    def routers(self) -> list[str]:
        return [c.info["grpc"] for c in self.children if c.name.startswith("router-")]

    @property
    def fabric_admin(self) -> str:
        fab = next(c for c in self.children if c.name == "fabric")
        return fab.info.get("admin_address", "")

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.children}

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def ready_info(self) -> dict[str, Any]:
        return {"pod": self.spec.name, "routers": self.routers, "fabric_admin": self.fabric_admin,
                "run_dir": str(self.spec.run_path), "pids": self.pids()}

    # -- stop ------------------------------------------------------------------------------
    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[str, int | None]:
        """SIGTERM all (reverse start order), SIGKILL stragglers, sweep shm; returns exit codes."""
        for c in reversed(self.children):
            if c.proc.poll() is None:
                try:
                    os.kill(c.proc.pid, signal.SIGCONT)   # a SIGSTOPped child cannot handle SIGTERM
                    os.kill(c.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        codes: dict[str, int | None] = {}
        for c in self.children:
            try:
                codes[c.name] = c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                codes[c.name] = c.proc.wait(timeout=10)
        self.sweep()
        return codes

    def sweep(self) -> list[str]:
        """Remove what the pod's processes may have left: shm segments of its namespace, sockets."""
        removed = []
        prefix = f"xds.{self.spec.namespace}."
        shm = Path("/dev/shm")
        if shm.is_dir():
            for p in shm.iterdir():
                if p.name.startswith(prefix):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        for p in self.spec.run_path.glob("*"):
            if p.suffix in (".rpc", ".hb", ".fabric", ".fabric-admin", ".ready") or p.is_socket():
                p.unlink(missing_ok=True)
        return removed

    def __enter__(self) -> Pod:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def up(spec: PodSpec, ready_file: str | None) -> int:
    """``xds up``: start, report, wait for SIGINT/SIGTERM, stop. Exit code 1 if start failed."""
    stop_requested = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    pod = Pod(spec)
    try:
        try:
            pod.start()
        except PodStartError as exc:
            print(f"xds up: {exc}", file=sys.stderr)
            return 1
        info = pod.ready_info()
        if ready_file:
            write_json_atomic(Path(ready_file), info)
        print(f"pod {spec.name} is up: routers {' '.join(info['routers'])} (logs in {spec.run_path})", flush=True)
        reported: set[str] = set()
        while not stop_requested:
            for c in pod.children:
                if c.proc.poll() is not None and c.name not in reported:
                    reported.add(c.name)
                    print(f"xds up: service {c.name} exited with code {c.proc.returncode}", file=sys.stderr)
            time.sleep(0.2)  # the signal handler only sets the flag
        return 0
    finally:
        pod.stop()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
        for s, h in old.items():
            signal.signal(s, h)
