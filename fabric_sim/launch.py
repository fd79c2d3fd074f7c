"""Start and stop a simulator process (for tests, benchmarks and launchers).

Readiness is the ready file the simulator writes atomically once both sockets are bound;
stopping is by PID: SIGTERM, then SIGKILL after a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class SimStartError(RuntimeError):
    """The simulator exited or did not become ready in time (its stderr tail is included)."""


@dataclass
class SimProcess:
    proc: subprocess.Popen
    config_path: Path
    ready_file: Path
    stderr_path: Path
    info: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def data_address(self) -> str:
        return self.info["data_address"]

    @property
    def admin_address(self) -> str:
        return self.info["admin_address"]

    def kill(self) -> None:
        """SIGKILL now (a crash), and reap."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 5.0) -> int:
        """SIGTERM; SIGKILL if still alive after ``timeout_s``. Returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)


def start_sim(workdir: Path, config: dict[str, Any], *, name: str = "fabric",
              timeout_s: float = 20.0) -> SimProcess:
    """Write ``config`` as YAML under ``workdir`` and start ``python -m fabric_sim`` on it."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return start_sim_from(cfg_path, workdir / f"{name}.ready.json", workdir / f"{name}.stderr",
                          timeout_s=timeout_s)


def start_sim_from(cfg_path: Path, ready_file: Path, stderr_path: Path, *,
                   timeout_s: float = 20.0) -> SimProcess:
    ready_file.unlink(missing_ok=True)
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fabric_sim", "--config", str(cfg_path),
                                 "--ready-file", str(ready_file)], stdout=subprocess.DEVNULL, stderr=err)
    sim = SimProcess(proc, cfg_path, ready_file, stderr_path, {})
    deadline = time.monotonic() + timeout_s
    # No event to wait on across processes but the file itself: poll it with a deadline.
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sim.stop()
            tail = stderr_path.read_text(errors="replace")[-2000:]
            raise SimStartError(f"fabric simulator did not become ready (exit {proc.returncode}): {tail}")
        time.sleep(0.01)
    sim.info = json.loads(ready_file.read_text())
    return sim
