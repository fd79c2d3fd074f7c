"""Typed errors of the XCCL data plane.

Three families, so callers can tell them apart (STYLE.md #6):
- local misuse (``WindowError``, ``EndpointClosed``): a bug in the caller, never retried;
- peer violation (``ProtocolError`` and subclasses): the peer broke the protocol;
- peer/fabric unavailable (``PeerUnreachable``, ``LinkDown``, ``FabricUnavailable``,
  ``XcclTimeout``): transient; ``RETRYABLE`` names exactly these.
"""

from __future__ import annotations


class XcclError(Exception):
    """Base of every XCCL error."""


class XcclTimeout(XcclError):
    """An operation did not complete within its timeout."""


class PeerUnreachable(XcclError):
    """The peer is dead, unknown, or not registered."""


class ExpertUnavailable(PeerUnreachable):
    """No live instance holds a routed expert a layer needs, and none came back in time.

    Names the expert and its holders, so the failure says which instances to restart."""

    def __init__(self, expert_id: int, holders: tuple[str, ...], waited_s: float) -> None:
        super().__init__(f"UNAVAILABLE: no live replica of routed expert {expert_id} (held by "
                         f"{', '.join(holders)}) after waiting {waited_s:.1f} s for one to come back")
        self.expert_id, self.holders, self.waited_s = expert_id, holders, waited_s


class ExpertCutOff(ExpertUnavailable):
    """Every holder of a routed expert is alive but unreachable from this source over the
    fabric (links down, partitions): the source's group cannot run the layer; other groups can."""

    def __init__(self, expert_id: int, holders: tuple[str, ...], source: str) -> None:
        PeerUnreachable.__init__(self, f"UNAVAILABLE: every replica of routed expert {expert_id} ({', '.join(holders)}) "
                                 f"is unreachable from {source} over the fabric")
        self.expert_id, self.holders, self.waited_s, self.source = expert_id, holders, 0.0, source


class LinkDown(XcclError):
    """The fabric refused the transfer: a link on the path is down or partitioned."""

    def __init__(self, message: str, link: str | None = None) -> None:
        super().__init__(message)
        self.link = link


class FabricUnavailable(XcclError):
    """The fabric simulator cannot be reached (transfers stall until it is back)."""


class EndpointClosed(XcclError):
    """The local endpoint was closed."""


class WindowError(XcclError):
    """Bad window name, offset or size for put/get (local misuse)."""


class BufferTooSmall(XcclError):
    """A received message does not fit the buffer given to ``recv_into`` (the message is kept:
    the next ``recv``/``recv_into`` from that peer gets it)."""

    def __init__(self, needed: int, have: int, peer: str = "") -> None:
        super().__init__(f"message{' from ' + peer if peer else ''} needs {needed} B, buffer holds {have} B")
        self.needed, self.have, self.peer = needed, have, peer


class ProtocolError(XcclError):
    """A peer violated the XCCL protocol."""


class EventIdMismatch(ProtocolError):
    """Metadata carried an event id other than the one expected."""


class ExpertRefused(ProtocolError):
    """An expert rank answered an A2E block with a refusal (it cannot serve it) instead of rows."""


class ChunkOrderError(ProtocolError):
    """A chunk of a chunked transfer arrived out of order."""


class CorruptMetadata(ProtocolError):
    """A metadata field holds an impossible value (bad tail pointer, size, magic)."""


RETRYABLE: tuple[type[XcclError], ...] = (XcclTimeout, PeerUnreachable, LinkDown, FabricUnavailable)
