"""Data-plane messages between a fabric client (DEALER) and the simulator (ROUTER).

Every reply carries the simulator's ``epoch`` (fresh per process start): a client that sees
a new epoch knows the simulator restarted and registers again. Requests carry the source
NPU, so a reservation is answerable even before the (re-)registration lands.
``req_id`` matches a reply to its request (many requests in flight per client); a reply to a
message that could not be decoded has ``req_id`` -1.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.wire import message


@message("fabric.register")
@dataclass(frozen=True, slots=True)
class Register:
    req_id: int
    name: str
    npu: int


@message("fabric.registered")
@dataclass(frozen=True, slots=True)
class Registered:
    req_id: int
    epoch: str
    npu: int
    npus: int
    time_scale: float


@message("fabric.reserve")
@dataclass(frozen=True, slots=True)
class Reserve:
    req_id: int
    src_npu: int
    dst_npu: int
    nbytes: int
    plane: str


@message("fabric.granted")
@dataclass(frozen=True, slots=True)
class Granted:
    req_id: int
    epoch: str
    # Wall seconds from when the simulator read the request; the client counts from when it
    # reads this reply, so deliveries err late (by one reply transit), never early.
    delay_s: float


@message("fabric.refused")
@dataclass(frozen=True, slots=True)
class Refused:
    req_id: int
    epoch: str
    link: str
    reason: str


# Failed.code values
BAD_MESSAGE = "bad_message"  # undecodable or unexpected message type
BAD_REQUEST = "bad_request"  # decodable but impossible (unknown NPU or plane, negative size)


@message("fabric.failed")
@dataclass(frozen=True, slots=True)
class Failed:
    req_id: int
    epoch: str
    code: str
    reason: str


@message("fabric.report")
@dataclass(frozen=True, slots=True)
class FidelityReport:
    """Optional, no reply: how late the client's waits ended past their deadlines (cumulative)."""

    name: str
    npu: int
    waits: int
    late_sum_s: float
    late_max_s: float


REQUESTS = (Register, Reserve, FidelityReport)
REPLIES = (Registered, Granted, Refused, Failed)
