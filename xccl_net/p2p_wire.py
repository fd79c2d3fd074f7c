"""Wire messages of XCCL over message transports (tcp, mem): typed, via services.common.wire.

Payloads are uint8 arrays, so they travel as raw frames (zero-copy), never pickled. The mem
double passes these objects directly; tcp encodes them with ``wire.encode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.common.wire import message


@message("xccl.hello")
@dataclass(frozen=True, slots=True)
class Hello:
    req_id: int
    name: str
    npu: int
    incarnation: int


@message("xccl.hello_reply")
@dataclass(frozen=True, slots=True)
class HelloReply:
    req_id: int
    name: str
    npu: int
    incarnation: int
    ring_slots: int
    slot_bytes: int


@message("xccl.chunk")
@dataclass(frozen=True, slots=True)
class Chunk:
    src_inc: int
    dst_inc: int
    event_id: int
    chunk_id: int
    n_chunks: int
    total_bytes: int
    kind: int
    flags: int
    payload: np.ndarray


@message("xccl.ack")
@dataclass(frozen=True, slots=True)
class Ack:
    src_inc: int          # incarnation of the acknowledging receiver
    dst_inc: int          # sender incarnation this ack is for
    head: int
    acked_event: int
    nack_event: int = 0
    nack_code: int = 0


@message("xccl.put")
@dataclass(frozen=True, slots=True)
class PutReq:
    req_id: int
    window: str
    offset: int
    data: np.ndarray
    notify: bytes | None


@message("xccl.get")
@dataclass(frozen=True, slots=True)
class GetReq:
    req_id: int
    window: str
    offset: int
    nbytes: int


_EMPTY = np.zeros(0, dtype=np.uint8)


@message("xccl.reply")
@dataclass(frozen=True, slots=True)
class Reply:
    req_id: int
    error: str = ""       # "" ok, "window": WindowError, anything else: ProtocolError
    detail: str = ""
    data: np.ndarray = field(default_factory=lambda: _EMPTY)


Message = Hello | HelloReply | Chunk | Ack | PutReq | GetReq | Reply
MESSAGES = (Hello, HelloReply, Chunk, Ack, PutReq, GetReq, Reply)
