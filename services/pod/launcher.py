"""Start a whole pod as local processes (``xds up``) and stop it cleanly.

Order: fabric simulator, then every service of ``spec.services`` (dependencies first). Each
service signals readiness through an inherited pipe (and a ``<run_dir>/<name>.ready`` file for
people and tools); the launcher waits on the pipes with a deadline. A service that exits before
it is ready fails the launch with that service's log tail. Stopping is by PID:
SIGTERM to every child (reverse order), SIGKILL to those still alive after the grace period,
then the pod's shared-memory namespace and sockets are swept.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.config import to_mapping
from services.common.runtime import READY_FD_ENV, ready_path, write_json_atomic
from services.model.cache import ensure_model
from services.pod.spec import PodSpec, load_pod, services

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PodStartError(RuntimeError):
    """A service did not become ready; the message names it and carries its stderr tail."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    ready_fd: int                      # read end of the child's readiness pipe (-1 once closed)
    info: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def close_ready_fd(self) -> None:
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1


class Pod:
    """A pod's processes, started from its spec and stopped by PID.

    ``start()`` runs the whole pod (what ``xds up`` does); ``start(only=[...])`` the fabric and
    a subset (tests); ``start_service`` starts or restarts one service. Readiness is an event:
    each child inherits the write end of a pipe and sends its ready JSON through it
    (``runtime.announce_ready``); end-of-file before that means it died, and the error carries
    its log tail.
    """

    def __init__(self, spec: PodSpec) -> None:
        self.spec = spec
        self.children: list[Child] = []
        self.spec_file = spec.run_path / "pod.yaml"
        self.killed: set[str] = set()   # SIGKILLed by us and not restarted: may leave segments
        self.swept: list[str] = []      # shm segments stop() had to remove (a clean pod: none)

    # -- start -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Run dir, model files and the resolved spec every service reads (idempotent).

        Resolving fixes what must not change when a service restarts: the model files, and
        under local addressing the routers' ports and the fabric's admin port (picked free
        once), so a restarted router or simulator comes back where its clients know it."""
        if not self.spec_file.exists():
            self.spec.run_path.mkdir(parents=True, exist_ok=True)
            model_dir = ensure_model(self.spec.model.dir, self.spec.model.preset, self.spec.model.seed,
                                     self.spec.cache_dir)
            resolved = to_mapping(self.spec)
            resolved["model"]["dir"] = str(model_dir)  # every service loads these very files
            if self.spec.addressing == "local":
                ports = list(self.spec.router_ports) or [0] * self.spec.routers
                resolved["router_ports"] = [p or free_port() for p in ports]
                resolved["fabric"] = {**resolved.get("fabric", {}),
                                      "admin_port": self.spec.fabric.get("admin_port") or free_port()}
            self.spec_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.spec = load_pod(self.spec_file)

    @property
    def model_dir(self) -> str:
        return yaml.safe_load(self.spec_file.read_text())["model"]["dir"]

    def start(self, timeout_s: float = READY_TIMEOUT_S, *, only: Sequence[str] | None = None,
              fabric: bool = True) -> Pod:
        try:
            self.prepare()
            if fabric:
                self._wait_ready([self._spawn("fabric")], timeout_s)
            names = [s.name for s in services(self.spec) if s.role != "fabric" and (only is None or s.name in only)]
            unknown = set(only or ()) - set(names)
            if unknown:
                raise PodStartError(f"no service named {sorted(unknown)} in pod {self.spec.name!r}")
            self._wait_ready([self._spawn(n) for n in names], timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_service(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> Child:
        """Start ``name`` (again, if an earlier process of it exited) and wait until it is ready."""
        self.prepare()
        if name in self.procs and self.alive(name):
            raise PodStartError(f"service {name} is already running (pid {self.procs[name].pid})")
        child = self._spawn(name)
        self._wait_ready([child], timeout_s)
        self.killed.discard(name)
        return child

    def _argv(self, name: str) -> list[str]:
        return [sys.executable, "-m", "services.run", "--pod", str(self.spec_file), "--name", name]

    def _spawn(self, name: str) -> Child:
        ready_path(self.spec, name).unlink(missing_ok=True)
        log_path = self.spec.run_path / f"{name}.log"
        r, w = os.pipe()
        env = dict(os.environ, XDS_LOG_FORMAT=os.environ.get("XDS_LOG_FORMAT", "json"), **{READY_FD_ENV: str(w)})
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(self._argv(name), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                        pass_fds=(w,), start_new_session=True)  # Ctrl-C goes to us only
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)  # only the child holds the write end: its exit is our end-of-file
        child = Child(name, proc, log_path, r)
        self.children.append(child)
        return child

    def _wait_ready(self, children: list[Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        buffers = {c.ready_fd: b"" for c in children}
        by_fd = {c.ready_fd: c for c in children}
        with selectors.DefaultSelector() as sel:
            for fd in by_fd:
                sel.register(fd, selectors.EVENT_READ)
            while by_fd:
                left = deadline - time.monotonic()
                if left <= 0:
                    c = next(iter(by_fd.values()))
                    raise PodStartError(f"service {c.name} not ready after {timeout_s:g}s; log ends with:\n"
                                        f"{c.log_tail()}")
                for key, _ in sel.select(left):
                    fd, c = key.fd, by_fd[key.fd]
                    chunk = os.read(fd, 65536)
                    buffers[fd] += chunk
                    if b"\n" in buffers[fd]:
                        c.info = json.loads(buffers[fd].split(b"\n", 1)[0])
                    elif chunk:
                        continue
                    sel.unregister(fd)
                    del by_fd[fd]
                    c.close_ready_fd()
                    if not c.info:  # end-of-file without a ready line: the child is gone
                        code = c.proc.wait(timeout=10)
                        raise PodStartError(f"service {c.name} exited with code {code} before it was "
                                            f"ready; its log ({c.log_path}) ends with:\n{c.log_tail()}")

    # -- facts -----------------------------------------------------------------------------
    @property
    def routers(self) -> list[str]:
        return [self.child(n).info["grpc"] for n in self.procs if n.startswith("router-")]

    @property
    def fabric_admin(self) -> str:
        return self.child("fabric").info.get("admin_address", "") if "fabric" in self.procs else ""

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The latest process of every service started so far."""
        return {c.name: c.proc for c in self.children}

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def child(self, name: str) -> Child:
        return next(c for c in reversed(self.children) if c.name == name)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def ready_info(self) -> dict[str, Any]:
        return {"pod": self.spec.name, "routers": self.routers, "fabric_admin": self.fabric_admin,
                "run_dir": str(self.spec.run_path), "pids": self.pids()}

    # -- stop ------------------------------------------------------------------------------
    def kill(self, name: str) -> int:
        """SIGKILL one service now (a crash): it cannot clean up after itself."""
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        self.killed.add(name)
        return p.wait(timeout=10)

    def stop_one(self, name: str, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM one service; SIGKILL if it is still alive after ``grace_s``. Its exit code."""
        return self._stop([self.child(name)], grace_s)[name]

    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[str, int]:
        """SIGTERM all (reverse start order), SIGKILL stragglers, sweep shm; returns the exit code
        of every service's latest process."""
        self._stop(list(reversed(self.children)), grace_s)
        self.swept = self.sweep()
        return {name: p.returncode for name, p in self.procs.items()}

    def _stop(self, children: list[Child], grace_s: float) -> dict[str, int]:
        for c in children:
            c.close_ready_fd()
            if c.proc.poll() is None:
                try:
                    os.kill(c.proc.pid, signal.SIGCONT)   # a SIGSTOPped child cannot handle SIGTERM
                    os.kill(c.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        codes: dict[str, int] = {}
        for c in children:
            try:
                codes[c.name] = c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                codes[c.name] = c.proc.wait(timeout=10)
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
