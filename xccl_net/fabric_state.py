"""Is the fabric simulator answering? One client's view, as a pure state machine.

The simulator emulates timing; it is not a data path. So while it is dead (killed, socket
gone) or hung (SIGSTOP, overloaded past the reservation deadline), transfers go on with no
modelled delay -- *unmodelled*, counted and reported -- and the client probes the simulator
in the background at a modest rate; its first answer switches timing back on.

States (one table, ``TRANSITIONS``):

- ``modelled``: every transfer reserves its completion time with the simulator;
- ``unmodelled``: it missed a reservation deadline (or its connection is gone): transfers
  proceed at once, each one counted; a probe (a ``Register``) is due every ``probe_interval_s``;
- ``closed``: the client is closed; any event is an error (``IllegalTransition``).

Events: ``missed`` (a reservation got no answer in time), ``registered`` (the simulator
acknowledged a registration: it is there, possibly a new process), ``probe`` (the probe timer
fired), ``close``. Link faults are answers (``Refused``), not misses: they keep failing
transfers exactly as before, because the simulator is alive to give them.

No asyncio, no zmq; ``now`` is injected. The client (``fabric_client.py``) turns the effects
into log lines, settled futures and sent probes.
"""

from __future__ import annotations

from dataclasses import dataclass

MODELLED, UNMODELLED, CLOSED = "modelled", "unmodelled", "closed"

TRANSITIONS: dict[tuple[str, str], str] = {
    (MODELLED, "missed"): UNMODELLED,
    (MODELLED, "registered"): MODELLED,        # first registration, or a re-registration after a restart
    (MODELLED, "close"): CLOSED,
    (UNMODELLED, "missed"): UNMODELLED,        # reservations in flight when the outage began
    (UNMODELLED, "probe"): UNMODELLED,
    (UNMODELLED, "registered"): MODELLED,      # it answered: timing resumes
    (UNMODELLED, "close"): CLOSED,
}


class IllegalTransition(RuntimeError):
    def __init__(self, owner: str, state: str, event: str) -> None:
        super().__init__(f"fabric link of {owner}: no transition from state {state!r} on event {event!r}")
        self.owner, self.state, self.event = owner, state, event


# ---- effects ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WentUnmodelled:
    """Log ``fabric.unavailable`` once; settle every reservation in flight as unmodelled."""
    reason: str
    outage: int          # 1 for the first outage of this client


@dataclass(frozen=True, slots=True)
class CameBack:
    """Log ``fabric.back``: the outage lasted ``outage_s``, ``unmodelled`` transfers went untimed."""
    outage_s: float
    unmodelled: int
    restarted: bool      # a new simulator process (new epoch), not the old one continued


@dataclass(frozen=True, slots=True)
class SendProbe:
    """Send one ``Register``; the next is due at ``next_at`` unless it answers first."""
    next_at: float


@dataclass(frozen=True, slots=True)
class EpochChanged:
    """Registered with a new simulator process while timing was on (a fast restart)."""
    epoch: str


Effect = WentUnmodelled | CameBack | SendProbe | EpochChanged


class FabricLink:
    def __init__(self, owner: str, *, probe_interval_s: float = 0.2) -> None:
        if not probe_interval_s > 0:
            raise ValueError(f"probe_interval_s must be > 0, got {probe_interval_s!r}")
        self.owner = owner
        self.probe_interval_s = probe_interval_s
        self.state = MODELLED
        self.epoch: str | None = None
        self.unmodelled_transfers = 0     # cumulative, every outage
        self.outages = 0
        self.probes = 0
        self._since = 0.0                 # when the current outage began
        self._unmodelled_at_start = 0
        self._epoch_at_start: str | None = None

    def _fire(self, event: str) -> str:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise IllegalTransition(self.owner, self.state, event)
        prev, self.state = self.state, nxt
        return prev

    @property
    def modelled(self) -> bool:
        return self.state == MODELLED

    # ---- events -------------------------------------------------------------------------
    def admit(self) -> bool:
        """A transfer starts: True = reserve it with the simulator; False = go unmodelled (counted)."""
        if self.state == CLOSED:
            raise IllegalTransition(self.owner, self.state, "admit")
        if self.state == MODELLED:
            return True
        self.unmodelled_transfers += 1
        return False

    def settle_unmodelled(self) -> None:
        """A reservation in flight gave up waiting: its transfer goes on unmodelled (counted)."""
        self.unmodelled_transfers += 1

    def missed(self, now: float, reason: str) -> list[Effect]:
        if self._fire("missed") == UNMODELLED:
            return []
        self.outages += 1
        self._since = now
        self._unmodelled_at_start = self.unmodelled_transfers
        self._epoch_at_start = self.epoch
        self.probes += 1
        return [WentUnmodelled(reason, self.outages), SendProbe(now + self.probe_interval_s)]

    def probe(self, now: float) -> list[Effect]:
        self._fire("probe")
        self.probes += 1
        return [SendProbe(now + self.probe_interval_s)]

    def registered(self, epoch: str, now: float) -> list[Effect]:
        prev = self._fire("registered")
        old, self.epoch = self.epoch, epoch
        if prev == UNMODELLED:
            return [CameBack(now - self._since, self.unmodelled_transfers - self._unmodelled_at_start,
                             restarted=self._epoch_at_start is not None and epoch != self._epoch_at_start)]
        if old is not None and old != epoch:
            return [EpochChanged(epoch)]
        return []

    def close(self) -> None:
        if self.state != CLOSED:
            self._fire("close")

    def load(self) -> dict[str, float]:
        """What a service's heartbeat carries about its fabric."""
        return {"fabric_unmodelled_transfers": float(self.unmodelled_transfers),
                "fabric_modelled": 1.0 if self.state == MODELLED else 0.0,
                "fabric_outages": float(self.outages)}
