"""Restart policy of a supervised pod: the pure core (no processes, no clock of its own).

Like Compose's ``restart: unless-stopped`` or a Kubernetes restart policy. The launcher tells
the core what happened to each service (``ready``, ``exited``, ``restarting``) with the time;
the core says what to do about an exit: ``Restart(at_s=...)`` or ``GiveUp(...)``.

Rules (settings: ``PodSpec.supervision``):
- Every exit the launcher did not ask for is a failure, whatever the code (0 included): the
  launcher filters out stops it requested before asking the core.
- Backoff: the n-th failure in a row waits ``backoff_initial_s * 2**(n-1)``, capped at
  ``backoff_max_s``. A process that stayed ready for ``stable_after_s`` before it died starts
  the streak again from the initial delay.
- Crash loop: a failure that would be the ``max_restarts + 1``-th within ``window_s`` (counting
  failures of the process between restarts) gives up on the service. A restart that exits before
  it is ready is a failure like any other.

Per-service lifecycle, as a table (``TRANSITIONS``): running → backing_off (exited) → starting
(restarting) → running (ready); any failure may end in gave_up, which is final.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from services.pod.spec import SupervisionSpec

State = Literal["running", "backing_off", "starting", "gave_up"]
Event = Literal["ready", "exited", "restarting", "give_up"]

TRANSITIONS: dict[tuple[State, Event], State] = {
    ("starting", "ready"): "running",
    ("running", "ready"): "running",           # started by hand again (``Pod.start_service``)
    ("backing_off", "ready"): "running",       # ditto, before the restart was due
    ("running", "exited"): "backing_off",
    ("starting", "exited"): "backing_off",
    ("backing_off", "restarting"): "starting",
    ("running", "give_up"): "gave_up",
    ("starting", "give_up"): "gave_up",
}


class IllegalTransition(RuntimeError):
    def __init__(self, service: str, state: State, event: Event) -> None:
        super().__init__(f"supervisor: service {service} cannot go through {event!r} in state {state!r}")
        self.service, self.state, self.event = service, state, event


@dataclass(frozen=True, slots=True)
class Restart:
    """Start ``service`` again at ``at_s`` (after ``delay_s`` of backoff)."""
    service: str
    at_s: float
    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """``service`` crash-loops: ``failures`` exits within ``window_s``."""
    service: str
    failures: int
    window_s: float

    @property
    def message(self) -> str:
        return (f"service {self.service} crash-loops: {self.failures} exits within {self.window_s:g}s "
                f"(supervision.max_restarts exceeded); giving up")


@dataclass(slots=True)
class _Service:
    state: State = "running"
    ready_since_s: float = 0.0
    streak: int = 0                                  # failures in a row without a stable run
    failures: deque[float] = field(default_factory=deque)   # exit times within the window
    restarts: int = 0


class Supervisor:
    """Decisions for every supervised service of one pod."""

    def __init__(self, settings: SupervisionSpec) -> None:
        self.settings = settings
        self._services: dict[str, _Service] = {}

    def _fire(self, name: str, event: Event) -> _Service:
        s = self._services.setdefault(name, _Service(state="starting"))
        nxt = TRANSITIONS.get((s.state, event))
        if nxt is None:
            raise IllegalTransition(name, s.state, event)
        s.state = nxt
        return s

    def ready(self, name: str, now_s: float) -> None:
        """A process of ``name`` is ready (first start, restart, or started by hand)."""
        self._fire(name, "ready").ready_since_s = now_s

    def exited(self, name: str, now_s: float) -> Restart | GiveUp:
        """A process of ``name`` exited without being asked to (before or after it was ready)."""
        cfg = self.settings
        s = self._services.setdefault(name, _Service(state="starting"))
        if s.state == "running" and now_s - s.ready_since_s >= cfg.stable_after_s:
            s.streak = 0
        s.failures.append(now_s)
        while s.failures and s.failures[0] < now_s - cfg.window_s:
            s.failures.popleft()
        if len(s.failures) > cfg.max_restarts:
            self._fire(name, "give_up")
            return GiveUp(name, len(s.failures), cfg.window_s)
        self._fire(name, "exited")
        s.streak += 1
        delay = min(cfg.backoff_initial_s * 2 ** (s.streak - 1), cfg.backoff_max_s)
        return Restart(name, now_s + delay, delay)

    def restarting(self, name: str) -> int:
        """The restart of ``name`` is being started now; returns its restart count."""
        s = self._fire(name, "restarting")
        s.restarts += 1
        return s.restarts

    def state(self, name: str) -> State | None:
        s = self._services.get(name)
        return s.state if s else None

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts started so far, per service (services never restarted are absent)."""
        return {n: s.restarts for n, s in self._services.items() if s.restarts}
