"""Typed SDK errors, one per gRPC status the pod uses; each carries the status and the message."""

from __future__ import annotations

import grpc


class XdsClientError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


class InvalidArgument(XdsClientError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(XdsClientError):
    status = grpc.StatusCode.NOT_FOUND


class Unavailable(XdsClientError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(XdsClientError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(XdsClientError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(XdsClientError):
    status = grpc.StatusCode.CANCELLED


class Internal(XdsClientError):
    status = grpc.StatusCode.INTERNAL


_BY_STATUS: dict[grpc.StatusCode, type[XdsClientError]] = {
    c.status: c for c in (InvalidArgument, NotFound, Unavailable, DeadlineExceeded, ResourceExhausted,
                          Cancelled, Internal)}


def from_status(status: grpc.StatusCode, message: str) -> XdsClientError:
    cls = _BY_STATUS.get(status)
    return cls(message) if cls is not None else XdsClientError(message, status)


def from_rpc_error(exc: grpc.RpcError) -> XdsClientError:
    return from_status(exc.code(), exc.details() or "")
