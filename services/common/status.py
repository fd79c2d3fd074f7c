"""The pod's one failure vocabulary: status codes, the refusal that carries one, and the
retry-versus-fail policy.

No zmq, no grpc, no asyncio: pure cores import it as freely as servers do. Codes are gRPC's
(the router maps them 1:1 to a client-visible status at its gRPC edge, ``router.service.grpc_code``)
and travel as typed values in wire messages (``rpc.Failed.code``, ``Tokens.code``), never as
``"CODE: message"`` strings.

Retry versus fail is decided here and nowhere else:
- ``retryable(code)``: the refusal is about the server's state, not the request (down,
  draining, busy): the same call may succeed later or elsewhere, so a caller waits for a
  backend rather than giving up.
- ``retry_elsewhere(code)``: worth trying on *another* server now. Besides the retryable
  codes, INTERNAL: a server that failed on it (a bug, a broken rank) says nothing of the
  next one, but waiting for the same one will not help.
Anything else (INVALID_ARGUMENT, NOT_FOUND, ...) is about the request itself and fails it.
"""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    """gRPC status codes (by name: the wire and the logs carry the name)."""
    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


RETRYABLE: frozenset[Code] = frozenset({Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED})
RETRY_ELSEWHERE: frozenset[Code] = RETRYABLE | {Code.INTERNAL}


def retryable(code: Code) -> bool:
    """Transient: the same call may succeed later (wait for it) or on another server."""
    return code in RETRYABLE


def retry_elsewhere(code: Code) -> bool:
    """Worth trying on another server now (see the module doc)."""
    return code in RETRY_ELSEWHERE


class Refused(Exception):
    """A request refused with a ``code``; ``message`` says why, for a human. Cores raise it;
    the RPC server sends it back as ``rpc.Failed`` and the caller gets it again as
    ``rpc.RemoteError`` (a subclass) with the same code and message."""

    def __init__(self, code: Code, message: str) -> None:
        code = Code(code)
        if code is Code.OK:
            raise ValueError("a refusal needs an error code, not OK")
        super().__init__(f"{code}: {message}")
        self.code: Code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return retryable(self.code)


__all__ = ["Code", "Refused", "RETRYABLE", "RETRY_ELSEWHERE", "retryable", "retry_elsewhere"]
