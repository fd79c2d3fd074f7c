"""Start a whole pod as local processes (``xds up``) and stop it cleanly.

Order: fabric simulator, then every service of ``spec.services`` (dependencies first). Each
service signals readiness through an inherited pipe (and a ``<run_dir>/<name>.ready`` file for
people and tools); the launcher waits on the pipes with a deadline. A service that exits before
it is ready fails the launch with that service's log tail. Stopping is by PID:
SIGTERM to every child (reverse order), SIGKILL to those still alive after the grace period,
then the pod's shared-memory namespace and sockets are swept.

Supervision (``xds up``; opt-in for ``Pod`` users: ``run_supervision()`` in the caller's thread or
``supervise()`` in a background thread): one loop waits on a selector for process exits (a pidfd
per ready service), readiness pipes of restarts in progress, restart timers and a wake-up pipe.
Decisions (backoff, crash-loop limit) come from the pure core ``services/pod/supervisor.py``.
A restart is spawned like any start, but its readiness is read by the same loop, so other
deaths are seen while it starts. Stops we request (``stop``, ``stop_one``) are never restarted;
a SIGSTOPped service is not dead to this loop (hangs are for heartbeats).
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.config import to_mapping
from services.common.runtime import READY_FD_ENV, ready_path, write_json_atomic
from services.model.cache import ensure_model
from services.pod.spec import PodSpec, load_pod, services
from services.pod.supervisor import GiveUp, Supervisor

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PodStartError(RuntimeError):
    """A service did not become ready; the message names it and carries its stderr tail."""


class PodCrashLoop(PodStartError):
    """A supervised service died too often (``supervision.max_restarts``): named, with its log tail."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.service = name


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
        self.restarts: dict[str, int] = {}   # supervised restarts that became ready, per service
        self.gave_up: BaseException | None = None   # why the background supervisor ended, if it failed
        self._changed = threading.Condition(threading.RLock())   # guards children; notified on restarts
        self._requested: set[str] = set()   # services we stopped on purpose: never restarted
        self._closing = False
        self._prepared = False
        self._wake_fds: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    # -- start -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Run dir, model files and the resolved spec every service reads (idempotent).

        Resolving fixes what must not change when a service restarts: the model files, and
        under local addressing the routers' ports (picked free once), so a restarted router
        comes back where its clients know it (the fabric's addresses are fixed paths).

        The file is written once per ``Pod`` object: a run dir left by an earlier pod of the
        same name (``stop`` keeps it for its logs) never lends this pod its old spec."""
        if not self._prepared:
            self.spec.run_path.mkdir(parents=True, exist_ok=True)
            model_dir = ensure_model(self.spec.model.dir, self.spec.model.preset, self.spec.model.seed,
                                     self.spec.cache_dir)
            resolved = to_mapping(self.spec)
            resolved["model"]["dir"] = str(model_dir)  # every service loads these very files
            if self.spec.addressing == "local":
                for key in ("router_ports", "router_http_ports"):
                    ports = list(getattr(self.spec, key)) or [0] * self.spec.routers
                    resolved[key] = [p or free_port() for p in ports]
            self.spec_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
            self._prepared = True
        self.spec = load_pod(self.spec_file)

    @property
    def model_dir(self) -> str:
        return yaml.safe_load(self.spec_file.read_text())["model"]["dir"]

    def start(self, timeout_s: float = READY_TIMEOUT_S, *, only: Sequence[str] | None = None,
              fabric: bool = True) -> Pod:
        self._closing = False
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
        self.wake()   # a running supervisor adopts the new services
        return self

    def start_service(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> Child:
        """Start ``name`` (again, if an earlier process of it exited) and wait until it is ready."""
        self.prepare()
        if name in self.procs and self.alive(name):
            raise PodStartError(f"service {name} is already running (pid {self.procs[name].pid})")
        self._requested.discard(name)
        child = self._spawn(name)
        self._wait_ready([child], timeout_s)
        self.killed.discard(name)
        self.wake()   # a running supervisor adopts it
        return child

    def _argv(self, name: str) -> list[str]:
        return [sys.executable, "-m", "services.run", "--pod", str(self.spec_file), "--name", name]

    def _spawn(self, name: str, marker: str = "") -> Child:
        """Start a process of ``name``; its log continues in ``<run_dir>/<name>.log`` (after
        ``marker``, a line that says why a new process writes there)."""
        ready_path(self.spec, name).unlink(missing_ok=True)
        log_path = self.spec.run_path / f"{name}.log"
        r, w = os.pipe()
        env = dict(os.environ, XDS_LOG_FORMAT=os.environ.get("XDS_LOG_FORMAT", "json"), **{READY_FD_ENV: str(w)})
        try:
            with open(log_path, "ab") as log:
                if marker:
                    log.write(f"----- {time.strftime('%Y-%m-%dT%H:%M:%S')} xds up: {marker} -----\n".encode())
                    log.flush()
                proc = subprocess.Popen(self._argv(name), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                        pass_fds=(w,), start_new_session=True)  # Ctrl-C goes to us only
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)  # only the child holds the write end: its exit is our end-of-file
        child = Child(name, proc, log_path, r)
        with self._changed:
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
    def http(self) -> list[str]:
        """The routers' OpenAI-compatible base URLs (``http://127.0.0.1:PORT``), one per router."""
        return [self.child(n).info["http"] for n in self.procs if n.startswith("router-")]

    @property
    def fabric_admin(self) -> str:
        return self.child("fabric").info.get("admin_address", "") if "fabric" in self.procs else ""

    @property
    def metrics(self) -> dict[str, str]:
        """Every service's /metrics URL (a restart binds a new port: the latest process's)."""
        return {n: self.child(n).info["metrics"] for n in self.procs if self.child(n).info.get("metrics")}

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The latest process of every service started so far."""
        with self._changed:
            return {c.name: c.proc for c in self.children}

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def child(self, name: str) -> Child:
        with self._changed:
            return next(c for c in reversed(self.children) if c.name == name)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def ready_info(self) -> dict[str, Any]:
        return {"pod": self.spec.name, "routers": self.routers, "http": self.http, "fabric_admin": self.fabric_admin,
                "metrics": self.metrics, "run_dir": str(self.spec.run_path), "pids": self.pids(),
                "restarts": dict(self.restarts)}

    # -- stop ------------------------------------------------------------------------------
    def kill(self, name: str) -> int:
        """SIGKILL one service now (a crash): it cannot clean up after itself. Under supervision
        it is restarted like any other death."""
        p = self.procs[name]
        self.killed.add(name)   # before the kill: a supervised restart discards it once ready
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        return p.wait(timeout=10)

    def stop_one(self, name: str, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM one service; SIGKILL if it is still alive after ``grace_s``. Its exit code.
        A stop we asked for: the supervisor does not restart it (``start_service`` does)."""
        self._requested.add(name)
        return self._stop([self.child(name)], grace_s)[name]

    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[str, int]:
        """SIGTERM all (reverse start order), SIGKILL stragglers, sweep shm; returns the exit code
        of every service's latest process."""
        self._end_supervision()
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

    # -- supervision -----------------------------------------------------------------------
    def supervise(self) -> Pod:
        """Restart dead services from a background thread from now on (idempotent). Its failure
        (a crash loop) is kept in ``gave_up`` and raised by ``wait_restarted``."""
        if self._thread is None:
            self._open_wake()
            self._thread = threading.Thread(target=self._supervise_in_thread, name=f"supervise-{self.spec.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def _supervise_in_thread(self) -> None:
        try:
            self.run_supervision()
        except BaseException as exc:   # reaches whoever waits: wait_restarted raises it
            with self._changed:
                self.gave_up = exc
                self._changed.notify_all()

    def wait_restarted(self, name: str, old_pid: int, timeout_s: float) -> Child:
        """Wait until the supervisor has a process of ``name`` other than ``old_pid`` running and
        ready; that child (its ``proc.pid`` is the new PID). TimeoutError at the deadline; the
        supervisor's own failure (``PodCrashLoop``) if it gave up."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if self.gave_up is not None:
                    raise self.gave_up
                c = self.child(name)
                if c.proc.pid != old_pid and c.info and c.ready_fd < 0 and c.proc.poll() is None:
                    return c
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"service {name} (pid {old_pid}) not restarted and ready within {timeout_s:g}s")
                self._changed.wait(left)

    def wake(self) -> None:
        """Make the supervision loop look again (a stop request, a service started by hand)."""
        if self._wake_fds is not None:
            try:
                os.write(self._wake_fds[1], b"!")
            except BlockingIOError:
                pass   # already awake

    def _open_wake(self) -> None:
        if self._wake_fds is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._wake_fds = (r, w)

    def _end_supervision(self) -> None:
        self._closing = True
        if self._thread is not None:
            self.wake()
            self._thread.join(timeout=30)
            self._thread = None
        if self._wake_fds is not None:
            for fd in self._wake_fds:
                os.close(fd)
            self._wake_fds = None

    def run_supervision(self, should_stop: Callable[[], bool] = lambda: False,
                        on_restart: Callable[[Child], None] | None = None) -> None:
        """Restart services that die, in this thread, until ``should_stop()`` (checked whenever
        the loop wakes: call ``wake()`` after changing it) or ``stop()``. Raises ``PodCrashLoop``
        when a service dies too often. ``on_restart(child)`` runs after each restart is ready."""
        self._open_wake()
        _SupervisionLoop(self, on_restart).run(should_stop)


class _SupervisionLoop:
    """The thin loop around the restart policy. Owns its pidfds; all waiting is one selector."""

    def __init__(self, pod: Pod, on_restart: Callable[[Child], None] | None) -> None:
        self.pod, self.on_restart = pod, on_restart
        self.settings = pod.spec.supervision
        self.core = Supervisor(self.settings)
        self.sel = selectors.DefaultSelector()
        self.seen: set[int] = set()                  # id() of children adopted or started here (kept in
                                                     # pod.children for good: ids stay unique)
        self.pidfds: dict[int, int] = {}             # pid -> pidfd of a watched, ready process
        self.starting: dict[int, tuple[Child, float]] = {}   # ready fd -> (restart, ready deadline)
        self.buffers: dict[int, bytes] = {}
        self.due: dict[str, float] = {}              # service -> monotonic time of its restart

    def run(self, should_stop: Callable[[], bool]) -> None:
        pod = self.pod
        assert pod._wake_fds is not None
        wake_r = pod._wake_fds[0]
        self.sel.register(wake_r, selectors.EVENT_READ, None)
        try:
            while not (should_stop() or pod._closing):
                self._adopt()
                timers = list(self.due.values()) + [d for _, d in self.starting.values() if d != math.inf]
                timeout = max(0.0, min(timers) - time.monotonic()) if timers else None
                for key, _ in self.sel.select(timeout):
                    if key.data is None:
                        while True:
                            try:
                                if not os.read(wake_r, 4096):
                                    break
                            except BlockingIOError:
                                break
                    else:
                        kind, child = key.data
                        if kind == "exit":
                            self._exited(child)
                        else:
                            self._read_ready(key.fd, child)
                if should_stop() or pod._closing:
                    break
                now = time.monotonic()
                for name, at in list(self.due.items()):
                    if at <= now:
                        del self.due[name]
                        self._restart(name)
                for fd, (child, deadline) in list(self.starting.items()):
                    if deadline <= now and child.proc.poll() is None:
                        _say(f"service {child.name} restart not ready after {self.settings.ready_timeout_s:g}s; killing it")
                        child.proc.kill()   # its pipe's end-of-file makes it a failed restart
                        self.starting[fd] = (child, math.inf)   # now wait for its end-of-file
        finally:
            self.sel.close()
            for fd in self.pidfds.values():
                os.close(fd)

    def _adopt(self) -> None:
        """Watch the latest ready process of every service we do not watch yet (started by
        ``start``/``start_service``)."""
        pod = self.pod
        with pod._changed:
            latest = {c.name: c for c in pod.children}
        for name, c in latest.items():
            if id(c) in self.seen or not c.info:
                continue
            self.seen.add(id(c))
            self.due.pop(name, None)   # started by hand while its restart was pending
            self.core.ready(name, time.monotonic())
            if c.proc.returncode is not None:
                self._exited(c)
            else:
                self._watch(c)

    def _watch(self, c: Child) -> None:
        try:
            fd = os.pidfd_open(c.proc.pid)
        except ProcessLookupError:   # already reaped (another thread waited on it)
            self._exited(c)
            return
        self.pidfds[c.proc.pid] = fd
        self.sel.register(fd, selectors.EVENT_READ, ("exit", c))

    def _exited(self, c: Child) -> None:
        fd = self.pidfds.pop(c.proc.pid, None)
        if fd is not None:
            self.sel.unregister(fd)
            os.close(fd)
        try:
            code = c.proc.wait(timeout=10)   # it is gone (pidfd readable or pipe closed): reap
        except subprocess.TimeoutExpired:   # closed its readiness pipe yet lives on: a failed start
            c.proc.kill()
            code = c.proc.wait(timeout=10)
        pod = self.pod
        if c is not pod.child(c.name) or c.name in pod._requested or pod._closing:
            return
        pod.killed.add(c.name)   # it may have left its shm segment until a restart replaces it
        if not self.settings.restart:
            _say(f"service {c.name} exited with code {code} (supervision.restart is off)")
            return
        d = self.core.exited(c.name, time.monotonic())
        if isinstance(d, GiveUp):
            raise PodCrashLoop(c.name, f"{d.message}; last exit code {code}; its log ({c.log_path}) ends with:\n"
                                       f"{c.log_tail()}")
        self.due[c.name] = d.at_s
        _say(f"service {c.name} (pid {c.proc.pid}) exited with code {code}; restarting in {d.delay_s:g}s")

    def _restart(self, name: str) -> None:
        n = self.core.restarting(name)
        old = self.pod.child(name)
        child = self.pod._spawn(name, marker=f"restart {n} of {name} (pid {old.proc.pid} exited with code "
                                             f"{old.proc.returncode})")
        self.seen.add(id(child))
        self.starting[child.ready_fd] = (child, time.monotonic() + self.settings.ready_timeout_s)
        self.buffers[child.ready_fd] = b""
        self.sel.register(child.ready_fd, selectors.EVENT_READ, ("ready", child))

    def _read_ready(self, fd: int, child: Child) -> None:
        chunk = os.read(fd, 65536)
        self.buffers[fd] += chunk
        if b"\n" in self.buffers[fd]:
            info = json.loads(self.buffers[fd].split(b"\n", 1)[0])
        elif chunk:
            return
        else:
            info = {}
        self.sel.unregister(fd)
        del self.starting[fd], self.buffers[fd]
        pod = self.pod
        if not info:   # end-of-file without a ready line: the restart died while starting
            with pod._changed:
                child.close_ready_fd()
            self._exited(child)
            return
        self.core.ready(child.name, time.monotonic())
        with pod._changed:   # one step for waiters: ready info, fd closed, count, shm bookkeeping
            child.info = info
            child.close_ready_fd()
            pod.restarts[child.name] = pod.restarts.get(child.name, 0) + 1
            pod.killed.discard(child.name)
            pod._changed.notify_all()
        self._watch(child)
        if self.on_restart is not None:   # before the line: who reads the line finds the new ready file
            self.on_restart(child)
        _say(f"service {child.name} restarted (pid {child.proc.pid}, restart {pod.restarts[child.name]})")


def _say(line: str) -> None:
    print(f"xds up: {line}", file=sys.stderr, flush=True)


def up(spec: PodSpec, ready_file: str | None) -> int:
    """``xds up``: start, report, supervise until SIGINT/SIGTERM, stop. Exit code 1 if the start
    failed or a service crash-looped past ``supervision.max_restarts`` (with its log tail)."""
    stop_requested = False
    pod = Pod(spec)

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True
        pod.wake()

    def report(child: Child | None = None) -> None:
        if ready_file:   # pids and restart counts as they are now, for tools and tests
            write_json_atomic(Path(ready_file), pod.ready_info())

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            pod.start()
            if stop_requested:
                return 0
            info = pod.ready_info()
            report()
            print(f"pod {spec.name} is up: routers {' '.join(info['routers'])}, OpenAI HTTP {' '.join(info['http'])} (logs in {spec.run_path})", flush=True)
            pod.run_supervision(lambda: stop_requested, report)
        except PodStartError as exc:
            print(f"xds up: {exc}", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        pod.stop()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
        for s, h in old.items():
            signal.signal(s, h)
