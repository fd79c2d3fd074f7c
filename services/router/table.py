"""The router's request table types: lifecycle states and events (the transition table),
the configuration, a request's entry and a backend peer as heartbeats show it. Data only;
``services.router.core`` holds the logic."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from services.common.liveness import Liveness
from services.common.status import Code
from services.model.sampling import SamplingParams
from services.router.effects import RouterError


class State(enum.StrEnum):
    ADMITTED = "admitted"        # in the table, no backend yet (or sent back for a replay)
    PREFILLING = "prefilling"    # a Prefill RPC is out
    DECODING = "decoding"        # first token streamed; a decode group produces the rest
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Event(enum.StrEnum):
    PREFILL = "prefill"
    FIRST_TOKEN = "first_token"
    TOKENS = "tokens"
    FINISH = "finish"
    RETRY = "retry"              # a prefill refused or timed out: try another one
    RESTART = "restart"          # prefill or decode backend lost: replay elsewhere
    CANCEL = "cancel"
    FAIL = "fail"


_LIVE = (State.ADMITTED, State.PREFILLING, State.DECODING)
TERMINAL = frozenset({State.FINISHED, State.CANCELLED, State.FAILED})

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.ADMITTED, Event.PREFILL): State.PREFILLING,
    (State.PREFILLING, Event.FIRST_TOKEN): State.DECODING,
    (State.PREFILLING, Event.FINISH): State.FINISHED,
    (State.PREFILLING, Event.RETRY): State.ADMITTED,
    (State.PREFILLING, Event.RESTART): State.ADMITTED,
    (State.DECODING, Event.TOKENS): State.DECODING,
    (State.DECODING, Event.FINISH): State.FINISHED,
    (State.DECODING, Event.RESTART): State.ADMITTED,
    **{(s, Event.CANCEL): State.CANCELLED for s in _LIVE},
    **{(s, Event.FAIL): State.FAILED for s in _LIVE},
}


class IllegalTransition(RouterError):
    def __init__(self, request_id: str, state: State, event: Event) -> None:
        super().__init__(f"request {request_id!r}: event {event.value!r} is illegal in state {state.value!r}")
        self.request_id, self.state, self.event = request_id, state, event


@dataclass(frozen=True, slots=True)
class RouterConfig:
    max_batch: int = 16                 # decode.max_batch of the pod
    kv_block_size: int = 16             # kv_pool.block_size of the pod
    max_waiting: int = 4096             # the admission queue (routing.max_waiting); full: RESOURCE_EXHAUSTED
    decode_slack: int = 8               # requests a DP group may queue beyond its batch (prefill overlaps decode)
    max_requests: int = 16384           # live + retained entries
    name: str = "router"                # this router's service name (for messages)
    retain_finished_s: float = 30.0
    max_restarts: int = 3               # replays of one request before it fails
    token_timeout_s: float = 30.0       # decoding with no token for this long -> replay
    vocab_size: int = 259
    backend_wait_s: float = 30.0        # wait for a live backend this long when the client set no deadline
    deadline_margin_s: float = 0.25     # give up this much before the client's deadline (our error reaches it)
    dead_after_s: float = 1.5           # heartbeat silence that kills a peer that woke after being declared dead


# --------------------------------------------------------------------------- table


@dataclass(slots=True)
class Request:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    created_s: float
    state: State = State.ADMITTED
    tokens: list[int] = field(default_factory=list)
    prefill: str = ""
    decode: str = ""
    finish_reason: str = ""      # "stop" | "length" | "cancelled" once terminal (failed: "")
    error_code: Code = Code.OK   # once failed: why (as the client sees it)
    error: str = ""
    ended_s: float | None = None
    last_progress_s: float = 0.0
    streams: int = 0             # attached client streams
    restarts: int = 0
    deadline_s: float | None = None      # the client's (monotonic), if it set one
    waiting_since_s: float | None = None  # waiting for a live backend since
    kv: Any = None               # prefilled, not yet admitted to a DP group
    tried: set[str] = field(default_factory=set)   # this round of the driver's current phase
    last_error: str = ""         # the driver's last backend failure (for the eventual error)
    last_code: Code | None = None
    prefill_sent_s: float = 0.0  # when the current Prefill went out
    admitted_s: float | None = None   # when the current DP group answered the Admit
    wait_why: str = ""           # why it waits for a backend (while waiting_since_s is set)
    staged: Any = None           # the KVRef staged at a prefill, until the DP group's first token shows it loaded

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def kv_blocks_needed(self, block_size: int) -> int:
        return math.ceil((len(self.prompt) + self.params.max_tokens) / block_size)


@dataclass(slots=True)
class Peer:
    role: str
    group: int = -1
    epoch: str = ""
    liveness: Liveness = Liveness.ALIVE
    status: str = "serving"
    load: dict[str, float] = field(default_factory=dict)
    woke: bool = False           # declared dead by silence, then beat again in the same epoch
    last_beat_s: float = 0.0

    @property
    def usable(self) -> bool:
        return self.liveness is Liveness.ALIVE and self.status == "serving"
