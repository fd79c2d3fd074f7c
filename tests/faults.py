"""Fault injection for tests, each proving it took effect before a test believes a recovery.

``hang(pid)`` stops a child process and returns once the kernel reports it stopped (``waitid``
with ``WSTOPPED``: an event, not a poll), then checks ``/proc/PID/stat`` says ``T``.
``resume(pid)`` continues it and waits for the ``WCONTINUED`` report. ``crash(proc)`` is
``kill -9`` and returns once the PID is reaped. These work on children of the calling process
(the launcher's ``Pod`` in the test process starts every service as one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from services.chaos.faults import proc_state  # one /proc reader for the tests and the chaos tool


class FaultNotInjected(AssertionError):
    """The fault did not take effect: a test must not go on to judge a recovery."""


def _wait_report(pid: int, flag: int, timeout_s: float) -> bool:
    # waitid blocks until the state change; WNOWAIT leaves the child waitable for its owner.
    done = threading.Event()

    def wait() -> None:
        try:
            os.waitid(os.P_PID, pid, flag | os.WNOWAIT)
        except ChildProcessError:
            pass
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return done.wait(timeout_s)


def hang(pid: int, timeout_s: float = 5.0) -> None:
    os.kill(pid, signal.SIGSTOP)
    if not _wait_report(pid, os.WSTOPPED, timeout_s) or proc_state(pid) != "T":
        raise FaultNotInjected(f"pid {pid} is not stopped after SIGSTOP (state {proc_state(pid)!r})")


def resume(pid: int, timeout_s: float = 5.0) -> None:
    os.kill(pid, signal.SIGCONT)
    if not _wait_report(pid, os.WCONTINUED, timeout_s):
        raise FaultNotInjected(f"pid {pid} did not report continuing after SIGCONT")


def crash(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """kill -9 and reap; the exit code (-9), or FaultNotInjected if the process survived."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)   # harmless if running
        os.kill(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=timeout_s)
    if proc_state(proc.pid) not in ("", "Z"):
        raise FaultNotInjected(f"pid {proc.pid} still exists after SIGKILL")
    return code
