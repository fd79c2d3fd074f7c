"""The pod's namespace holder under Docker Compose (Kubernetes calls it the pause container).

Every other container of the pod joins this one's IPC namespace (``ipc: service:pod``: one
``/dev/shm`` for XCCL segments) and PID namespace (``pid: service:pod``: XCCL judges a peer
segment's owner alive by PID, so PIDs must mean the same process everywhere). Doing nothing
else, it cannot crash with the work, and a service container that dies or restarts leaves
the shared namespaces in place. As the PID namespace's init it reaps orphans, and it exits at
once on SIGTERM/SIGINT (``docker compose down`` stays quick).

``python -m services.pod.holder``
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    stop = False

    def on_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    def on_child(signum: int, frame: object) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGCHLD, on_child)
    print("pod holder: ready", flush=True)
    while not stop:
        signal.pause()  # handlers run here; nothing else to do
    return 0


if __name__ == "__main__":
    sys.exit(main())
