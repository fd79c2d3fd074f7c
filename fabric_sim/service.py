"""Data-plane request handling: frames in, replies out. Pure (no zmq, no asyncio, no clock).

``handle_batch(messages, now)`` takes what the ROUTER socket delivered (identity frame +
message frames each) and returns ``(identity, reply frames)`` pairs. All reservations of a
batch go to the model together with one ``now`` (they are simultaneous, see model.py).
Bad input never raises: an undecodable message gets a ``Failed(bad_message)`` reply when it
has an identity to answer, an impossible request a ``Failed(bad_request)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fabric_sim.model import FabricModel, Grant, Refusal, Rejected, TransferRequest
from fabric_sim.protocol import (BAD_MESSAGE, BAD_REQUEST, REQUESTS, Failed, FidelityReport, Granted,
                                 Refused, Register, Registered, Reserve)
from services.common.wire import WireError, decode, encode

Reply = tuple[bytes, list]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    name: str
    npu: int


@dataclass
class Fidelity:
    """Latest cumulative report per client: how late deliveries were past their targets."""

    waits: int = 0
    late_sum_s: float = 0.0
    late_max_s: float = 0.0


@dataclass
class ServiceCounters:
    requests: int = 0
    reservations: int = 0
    grants: int = 0
    refusals: int = 0
    bad_messages: int = 0
    bad_requests: int = 0
    batches: int = 0
    batch_peak: int = 0
    last_problem: str = ""
    fidelity: dict[str, Fidelity] = field(default_factory=dict)


class FabricService:
    def __init__(self, model: FabricModel, epoch: str) -> None:
        self.model = model
        self.epoch = epoch
        self.clients: dict[bytes, ClientInfo] = {}
        self.counters = ServiceCounters()

    def _failed(self, ident: bytes, req_id: int, code: str, reason: str) -> Reply:
        c = self.counters
        if code == BAD_MESSAGE:
            c.bad_messages += 1
        else:
            c.bad_requests += 1
        c.last_problem = f"{code}: {reason}"
        return ident, encode(Failed(req_id, self.epoch, code, reason[:500]))

    def handle_batch(self, messages: list[list[bytes]], now: float) -> list[Reply]:
        c = self.counters
        c.batches += 1
        c.batch_peak = max(c.batch_peak, len(messages))
        replies: list[Reply] = []
        pending: list[tuple[bytes, Reserve]] = []
        for frames in messages:
            c.requests += 1
            if len(frames) < 2:
                if frames:
                    replies.append(self._failed(frames[0], -1, BAD_MESSAGE, "no message frames after the identity"))
                else:
                    c.bad_messages += 1
                continue
            ident = frames[0]
            try:
                msg = decode(frames[1:], expect=REQUESTS)
            except WireError as exc:
                replies.append(self._failed(ident, -1, BAD_MESSAGE, str(exc)))
                continue
            if isinstance(msg, Reserve):
                pending.append((ident, msg))
            elif isinstance(msg, Register):
                replies.append(self._register(ident, msg))
            elif isinstance(msg, FidelityReport):
                c.fidelity[f"{msg.name}@npu{msg.npu}"] = Fidelity(
                    max(0, msg.waits), max(0.0, msg.late_sum_s), max(0.0, msg.late_max_s))
        if pending:
            replies.extend(self._reserve(pending, now))
        return replies

    def _register(self, ident: bytes, msg: Register) -> Reply:
        try:
            self.model.topo.check_npu(msg.npu)
        except ValueError as exc:
            return self._failed(ident, msg.req_id, BAD_REQUEST, f"register {msg.name!r}: {exc}")
        self.clients[ident] = ClientInfo(msg.name, msg.npu)
        return ident, encode(Registered(msg.req_id, self.epoch, msg.npu, self.model.topo.npus,
                                        self.model.scale))

    def _reserve(self, pending: list[tuple[bytes, Reserve]], now: float) -> list[Reply]:
        c = self.counters
        reqs = [TransferRequest(m.src_npu, m.dst_npu, m.nbytes, m.plane) for _, m in pending]
        outcomes = self.model.reserve_batch(reqs, now)
        replies: list[Reply] = []
        for (ident, m), out in zip(pending, outcomes):
            c.reservations += 1
            if isinstance(out, Grant):
                c.grants += 1
                replies.append((ident, encode(Granted(m.req_id, self.epoch, out.delay_s))))
            elif isinstance(out, Refusal):
                c.refusals += 1
                replies.append((ident, encode(Refused(m.req_id, self.epoch, out.link, out.reason))))
            else:
                assert isinstance(out, Rejected)
                replies.append(self._failed(ident, m.req_id, BAD_REQUEST, out.reason))
        return replies
