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
    # Signals are taken synchronously (no handler/pause race: a SIGTERM can never be missed).
    wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    print("pod holder: ready", flush=True)
    while True:
        info = signal.sigwaitinfo(wanted)
        if info.si_signo != signal.SIGCHLD:
            return 0
        while True:  # reap every exited orphan
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


if __name__ == "__main__":
    sys.exit(main())
