"""A Docker engine for the compose test: the running one, or a private ``dockerd`` started here.

As ../shared/DOCKER.md describes for machines without systemd: ``dockerd`` with its state in a
fresh temp dir and its API on a socket there, stopped by PID at the end, its state removed
(the nsfs mounts under the exec root unmounted first), and the ``docker0`` bridge it created
deleted, and the host's iptables rules restored. Readiness is an event: dockerd logs "API
listen on <socket>" when it serves; a reader thread of its log pipe sets an event on that line
(waited on with a deadline) instead of polling ``docker info``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path


class EngineUnavailable(RuntimeError):
    """No engine is running and none can be started here (the reason says why)."""


def _works(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], env=env, capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class DockerEngine:
    def __init__(self) -> None:
        # Debian's docker client first: compose 1.29.2 shells out to `docker` for builds, and
        # /usr/local/bin/docker (a newer client without buildx) would shadow it.
        self.env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
        self.proc: subprocess.Popen | None = None
        self.state: Path | None = None
        self._made_bridge = False
        self._iptables = ""
        self.log_lines: list[str] = []

    @property
    def started_here(self) -> bool:
        return self.proc is not None

    def start(self, timeout_s: float = 60.0) -> DockerEngine:
        if _works(self.env):
            return self  # an engine is running (DOCKER_HOST or the default socket): use it
        dockerd = shutil.which("dockerd", path=self.env["PATH"])
        if dockerd is None:
            raise EngineUnavailable("no Docker engine is running and dockerd is not installed "
                                    "(apt-get install docker.io docker-compose debootstrap)")
        if os.geteuid() != 0:
            raise EngineUnavailable("no Docker engine is running and starting dockerd needs root")
        self._made_bridge = not Path("/sys/class/net/docker0").exists()
        # dockerd adds its iptables chains and sets FORWARD to DROP: put the host's rules back after.
        save = shutil.which("iptables-save")
        self._iptables = subprocess.run([save], capture_output=True, text=True).stdout if save else ""
        self.state = Path(tempfile.mkdtemp(prefix="xdsd", dir="/tmp"))
        sock = self.state / "docker.sock"
        self.proc = subprocess.Popen(
            [dockerd, "--data-root", str(self.state / "data"), "--exec-root", str(self.state / "exec"),
             "-H", f"unix://{sock}", "--pidfile", str(self.state / "dockerd.pid")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True)
        self.env["DOCKER_HOST"] = f"unix://{sock}"
        # One reader for dockerd's whole life (it must never block on a full pipe); it also
        # signals the "API listen on" line, our readiness event, and keeps a tail for errors.
        self._serving = threading.Event()
        self._listening = False
        self._drain = threading.Thread(target=self._read_log, args=(f"API listen on {sock}",), daemon=True)
        self._drain.start()
        try:
            if not self._serving.wait(timeout_s):
                raise EngineUnavailable(f"dockerd not serving after {timeout_s:g}s:\n" + "\n".join(self.log_lines[-20:]))
            if not self._listening:
                raise EngineUnavailable("dockerd exited:\n" + "\n".join(self.log_lines[-20:]))
        except BaseException:
            self.stop()
            raise
        return self

    def _read_log(self, needle: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log_lines = (self.log_lines + [line])[-200:]
            if needle in line:
                self._listening = True
                self._serving.set()
        self._serving.set()  # end of output: dockerd is gone (start() tells the two apart)

    def run(self, *args: str, timeout_s: float = 300, check: bool = True, cwd: str | None = None,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command against this engine (docker, docker-compose, scripts). Its own process
        group: on timeout the whole group is killed (a build script's debootstrap too)."""
        env = dict(self.env, **(extra_env or {}))
        proc = subprocess.Popen(list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=cwd, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{' '.join(args)} did not finish in {timeout_s:g}s") from None
        res = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {res.returncode}:\n{out[-3000:]}\n{err[-3000:]}")
        return res

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop a dockerd started here by PID, remove its state; leave a running engine alone."""
        if self.proc is None:
            return
        assert self.state is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # Killed without its shutdown, dockerd leaves its containerd running: by PID too.
                containerd = self.state / "exec" / "containerd" / "containerd.pid"
                pid = int(containerd.read_text().strip() or 0) if containerd.exists() else 0
                self.proc.kill()
                self.proc.wait(timeout=10)
                if pid > 0:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        drain = getattr(self, "_drain", None)
        if drain is not None:
            drain.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        exec_root = self.state / "exec"
        if exec_root.exists():
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                      if line.split()[1].startswith(str(self.state))]
            for m in sorted(mounts, key=len, reverse=True):
                subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.state, ignore_errors=True)
        if self._made_bridge and Path("/sys/class/net/docker0").exists():
            subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True)
        restore = shutil.which("iptables-restore")
        if self._iptables and restore:
            subprocess.run([restore], input=self._iptables, capture_output=True, text=True)
