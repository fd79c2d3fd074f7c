"""What the router's pure core (``services.router.core``) hands its servicer: refusals
(``RouterError``, a ``status.Refused``) and effects (``Effect``: to carry out; ``Call``: the
request driver's next backend call or wait). Data only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.status import Code, Refused


class RouterError(Refused):
    """A refusal (``status.Code``); the servicer maps ``code`` to the client status.
    Subclasses fix the code; ``code`` overrides it."""

    code = Code.INTERNAL

    def __init__(self, message: str, code: Code | None = None) -> None:
        super().__init__(type(self).code if code is None else code, message)


class InvalidRequestError(RouterError):
    code = Code.INVALID_ARGUMENT


class UnknownRequest(RouterError):
    code = Code.NOT_FOUND


class NoBackend(RouterError):
    code = Code.UNAVAILABLE


class TableFull(RouterError):
    code = Code.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class SendCancel:
    """Tell ``service`` (a decode master) to stop producing ``request_id``."""
    service: str
    request_id: str


@dataclass(frozen=True, slots=True)
class ReleaseStage:
    """Tell prefill ``service`` that the KV it staged for ``owner`` (``stage_id``) will not be
    loaded: the request ended before a DP group took it."""
    service: str
    owner: str
    stage_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """(Re-)announce this router to a decode master: it is new or restarted."""
    service: str


@dataclass(frozen=True, slots=True)
class Wake:
    """The request's tokens or state changed: wake its streams and its driver."""
    request_id: str


@dataclass(frozen=True, slots=True)
class Restart:
    """The request went back to ``admitted``: its driver must prefill it again (abandoning
    any backend call in flight)."""
    request_id: str
    reason: str


Effect = SendCancel | ReleaseStage | Subscribe | Wake | Restart


@dataclass(frozen=True, slots=True)
class CallPrefill:
    """Prefill prompt + tokens so far on ``service``; answer with ``prefill_answered`` or ``call_failed``."""
    request_id: str
    service: str


@dataclass(frozen=True, slots=True)
class CallAdmit:
    """Admit the prefilled request (``kv``) to the DP group ``service``; answer with
    ``admit_answered`` or ``call_failed``."""
    request_id: str
    service: str
    kv: Any


@dataclass(frozen=True, slots=True)
class WaitBackend:
    """None to try now: wait for the next heartbeat (a backend may be back, or less busy), at
    most ``wait_s``; then ask ``next_call`` again."""
    request_id: str
    wait_s: float
    why: str


Call = CallPrefill | CallAdmit | WaitBackend
