"""Failure detector: peer liveness alive -> suspect -> dead, driven by heartbeats and silence.

Pure core (no sockets, no clock of its own): ``observe(beat, now)`` and ``tick(now)`` return
the state changes they caused. The transition table below is the whole lifecycle; anything
else is an ``IllegalTransition`` naming the peer, state and event.

Rules:
- Silence, not socket errors, is the signal: a hung process (SIGSTOP, a wedged event loop)
  stops beating just as a dead one does, because beats are sent from the service's own loop.
- ``dead`` is final for an epoch. A process that was declared dead and then wakes up (SIGCONT)
  keeps its old epoch: its beats are ignored, because its requests were already moved.
  A restarted process has a new epoch and comes back ``alive``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from services.common.config import ConfigError


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


class Event(enum.StrEnum):
    BEAT = "beat"                      # heartbeat of the current epoch
    NEW_EPOCH = "new_epoch"            # heartbeat of a different epoch (the peer restarted)
    SILENT_SUSPECT = "silent_suspect"  # no beat for suspect_after_s
    SILENT_DEAD = "silent_dead"        # no beat for dead_after_s


TRANSITIONS: dict[tuple[Liveness, Event], Liveness] = {
    (Liveness.ALIVE, Event.BEAT): Liveness.ALIVE,
    (Liveness.ALIVE, Event.NEW_EPOCH): Liveness.ALIVE,
    (Liveness.ALIVE, Event.SILENT_SUSPECT): Liveness.SUSPECT,
    (Liveness.ALIVE, Event.SILENT_DEAD): Liveness.DEAD,
    (Liveness.SUSPECT, Event.BEAT): Liveness.ALIVE,
    (Liveness.SUSPECT, Event.NEW_EPOCH): Liveness.ALIVE,
    (Liveness.SUSPECT, Event.SILENT_DEAD): Liveness.DEAD,
    (Liveness.DEAD, Event.NEW_EPOCH): Liveness.ALIVE,
}


class IllegalTransition(RuntimeError):
    def __init__(self, peer: str, state: Liveness, event: Event) -> None:
        super().__init__(f"peer {peer!r}: event {event.value!r} is illegal in state {state.value!r}")
        self.peer, self.state, self.event = peer, state, event


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    suspect_after_s: float = 0.6
    dead_after_s: float = 1.5

    def __post_init__(self) -> None:
        if not 0 < self.suspect_after_s < self.dead_after_s:
            raise ConfigError("DetectorConfig.suspect_after_s",
                              "must be > 0 and smaller than dead_after_s")


@dataclass(frozen=True, slots=True)
class Change:
    peer: str
    old: Liveness | None  # None: first time seen
    new: Liveness
    epoch: str


@dataclass(slots=True)
class PeerView:
    state: Liveness
    epoch: str
    last_beat: float
    info: dict[str, Any] = field(default_factory=dict)  # the peer's latest status/load


class FailureDetector:
    def __init__(self, cfg: DetectorConfig = DetectorConfig()) -> None:
        self.cfg = cfg
        self.peers: dict[str, PeerView] = {}
        self.ignored_beats = 0  # beats of an epoch already declared dead

    def _apply(self, peer: str, view: PeerView, event: Event) -> Change | None:
        new = TRANSITIONS.get((view.state, event))
        if new is None:
            raise IllegalTransition(peer, view.state, event)
        old, view.state = view.state, new
        return Change(peer, old, new, view.epoch) if old != new else None

    def observe(self, peer: str, epoch: str, now: float, info: dict[str, Any] | None = None) -> list[Change]:
        view = self.peers.get(peer)
        if view is None:
            self.peers[peer] = PeerView(Liveness.ALIVE, epoch, now, dict(info or {}))
            return [Change(peer, None, Liveness.ALIVE, epoch)]
        if epoch == view.epoch and view.state is Liveness.DEAD:
            self.ignored_beats += 1
            return []
        event = Event.BEAT if epoch == view.epoch else Event.NEW_EPOCH
        view.epoch, view.last_beat = epoch, now
        if info is not None:
            view.info = dict(info)
        change = self._apply(peer, view, event)
        return [change] if change else []

    def tick(self, now: float) -> list[Change]:
        changes = []
        for peer, view in self.peers.items():
            if view.state is Liveness.DEAD:
                continue
            # Deadlines as ``next_due`` computes them (the same float sums): ticking at the due
            # time must change the state, never find it a rounding error short.
            event = (Event.SILENT_DEAD if now >= view.last_beat + self.cfg.dead_after_s
                     else Event.SILENT_SUSPECT if (view.state is Liveness.ALIVE
                                                   and now >= view.last_beat + self.cfg.suspect_after_s)
                     else None)
            if event is not None:
                change = self._apply(peer, view, event)
                if change:
                    changes.append(change)
        return changes

    def next_due(self) -> float | None:
        """The earliest time at which ``tick`` could change a state if no beat arrives first
        (a live peer's suspect deadline, a suspect one's dead deadline); None when no peer
        can change by silence (none known, or all dead). A driver that ticks at this time,
        rather than on a fixed period, detects on time and sleeps while all is well."""
        due = None
        for view in self.peers.values():
            if view.state is Liveness.DEAD:
                continue
            t = view.last_beat + (self.cfg.suspect_after_s if view.state is Liveness.ALIVE else self.cfg.dead_after_s)
            if due is None or t < due:
                due = t
        return due

    def alive(self) -> dict[str, PeerView]:
        return {p: v for p, v in self.peers.items() if v.state is Liveness.ALIVE}

    def state(self, peer: str) -> Liveness | None:
        view = self.peers.get(peer)
        return view.state if view else None
