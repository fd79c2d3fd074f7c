"""The standard gRPC health check (``grpc.health.v1.Health/Check``): server and a cheap probe.

Server side, ``HealthServer``: every pod service serves the health service on its ``health``
address (``spec.address(..., "health")``). It reports NOT_SERVING until the service is ready,
SERVING then, and NOT_SERVING again while it drains. The handler runs on the service's own
event loop, so a hung loop fails the check by timing out, not only a dead process.

Probe side, ``probe()``: one Check call spoken over HTTP/2 cleartext with the standard library
only. A Docker healthcheck runs every few seconds in every container of a 2-core machine;
``python -S health.py ADDRESS`` costs ~20 ms of CPU where importing grpcio costs ~150 ms, and
it works in a container's bare interpreter. The probe sends a fixed request (HPACK literals
only) and reads the response message; it never needs to decode the server's headers, because
a Check that fails has no message (trailers-only response) and then reports not serving.

This file imports nothing outside the standard library at module level: it is run as a script
(``python -S services/common/health.py ADDRESS [SERVICE]``; exit 0 only when SERVING).
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from typing import Any

CHECK_PATH = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

# HTTP/2 (RFC 9113) frame types and flags used here.
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class HealthProbeError(Exception):
    """The check could not be made: connection refused, timeout, protocol error, RPC error."""


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """'Literal header field without indexing, new name', no Huffman (RFC 7541 6.2.2)."""
    out = bytearray(b"\x00")
    for s in (name.encode(), value.encode()):
        if len(s) >= 127:
            raise ValueError("header too long for this probe")
        out += bytes([len(s)]) + s
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _request(authority: str, service: str) -> bytes:
    headers = b"".join(_hpack_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", CHECK_PATH), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers")))
    msg = b"\x0a" + _varint(len(service.encode())) + service.encode() if service else b""
    body = b"\x00" + struct.pack(">I", len(msg)) + msg   # gRPC length-prefixed message
    return (_PREFACE + _frame(_SETTINGS, 0, 0) + _frame(_HEADERS, _END_HEADERS, 1, headers)
            + _frame(_DATA, _END_STREAM, 1, body))


def _connect(address: str, timeout_s: float) -> tuple[socket.socket, str]:
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        path = path[2:] if path.startswith("//") else path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(path)
        return sock, "localhost"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise HealthProbeError(f"bad address {address!r}: want host:port or unix:/path")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    return sock, address


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HealthProbeError("timed out waiting for the answer")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HealthProbeError("server closed the connection before answering")
        buf += chunk
    return bytes(buf)


def _status_of(message: bytes) -> int:
    """HealthCheckResponse: field 1 (varint) is the status; absent means 0 (UNKNOWN)."""
    i, status = 0, 0
    while i < len(message):
        tag = message[i]
        i += 1
        if tag != 0x08:
            raise HealthProbeError(f"unexpected field tag {tag:#x} in HealthCheckResponse")
        status, shift = 0, 0
        while True:
            b = message[i]
            i += 1
            status |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
    return status


def probe(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """One health Check against ``address`` (``host:port`` or ``unix:/path``): the status name.

    Raises ``HealthProbeError`` when no answer could be had (refused, timeout, RPC error such as
    NOT_FOUND for an unknown service name).
    """
    deadline = time.monotonic() + timeout_s
    try:
        sock, authority = _connect(address, timeout_s)
    except OSError as exc:
        raise HealthProbeError(f"{address}: {exc}") from exc
    try:
        sock.sendall(_request(authority, service))
        message = b""
        while True:
            head = _recv_exact(sock, 9, deadline)
            length = int.from_bytes(head[:3], "big")
            ftype, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = _recv_exact(sock, length, deadline)
            if ftype in (_DATA, _HEADERS) and flags & _PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if ftype == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0))
            elif ftype == _PING and not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif ftype == _GOAWAY or (ftype == _RST_STREAM and stream == 1):
                raise HealthProbeError(f"{address}: the server reset the call (frame type {ftype})")
            elif ftype == _DATA and stream == 1:
                message += payload
            if stream == 1 and ftype in (_DATA, _HEADERS) and flags & _END_STREAM:
                break
        if len(message) < 5:
            # Trailers only: the RPC failed (e.g. NOT_FOUND for a service name never set).
            raise HealthProbeError(f"{address}: the Check call failed (no response message)")
        (n,) = struct.unpack(">I", message[1:5])
        return STATUS_NAMES.get(_status_of(message[5:5 + n]), "UNKNOWN")
    except (OSError, IndexError) as exc:
        raise HealthProbeError(f"{address}: {exc}") from exc
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: health.py ADDRESS [SERVICE]   (ADDRESS: host:port or unix:/path)", file=sys.stderr)
        return 2
    try:
        status = probe(argv[0], argv[1] if len(argv) > 1 else "")
    except HealthProbeError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


class HealthServer:
    """grpc.health.v1 on ``bind`` (``host:port`` or ``unix:/path``), for one service."""

    def __init__(self, bind: str) -> None:
        self.bind = bind
        self._server: Any = None
        self._servicer: Any = None

    async def start(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1.health import aio as health_aio

        self._pb = health_pb2
        self._server = grpc.aio.server()
        self._servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)
        try:
            port = self._server.add_insecure_port(self.bind)
        except RuntimeError as exc:   # grpcio raises this when it cannot bind
            port, why = 0, exc
        else:
            why = None
        if not port:
            raise OSError(f"cannot bind the health service on {self.bind}: {why or 'address in use?'}")
        await self._server.start()
        await self.set(False)

    @property
    def servicer(self) -> Any:
        """The health servicer, to serve the same status on another gRPC server too (a router's
        client-facing port); ``start`` first."""
        return self._servicer

    async def set(self, serving: bool) -> None:
        status = self._pb.HealthCheckResponse.SERVING if serving else self._pb.HealthCheckResponse.NOT_SERVING
        await self._servicer.set("", status)

    async def stop(self, grace_s: float = 0.2) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
