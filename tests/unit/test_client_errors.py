"""SDK: status -> typed error mapping, and the blocking client's loop/thread lifecycle."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest

from services.client import (DeadlineExceeded, InvalidArgument, NotFound, SyncInferenceClient, Unavailable,
                             XdsClientError)
from services.client.errors import from_status


@pytest.mark.parametrize("status, cls", [(grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
                                         (grpc.StatusCode.NOT_FOUND, NotFound),
                                         (grpc.StatusCode.UNAVAILABLE, Unavailable),
                                         (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded)])
def test_statuses_map_to_typed_errors_carrying_status_and_message(status, cls) -> None:
    e = from_status(status, "why")
    assert type(e) is cls and isinstance(e, XdsClientError) and e.status is status and e.message == "why"
    assert str(e) == f"{status.name}: why"
    other = from_status(grpc.StatusCode.PERMISSION_DENIED, "no")
    assert type(other) is XdsClientError and other.status is grpc.StatusCode.PERMISSION_DENIED


def test_sync_client_reports_unreachable_routers_and_leaves_no_thread_behind() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = [f"127.0.0.1:{s.getsockname()[1]}"]
    before = {t.ident for t in threading.enumerate()}
    c = SyncInferenceClient(dead + dead, timeout_s=5)
    with pytest.raises(Unavailable, match="no router available"):
        c.model_info()
    with pytest.raises(Unavailable, match="no router could serve it"):
        list(c.generate("hi", max_tokens=2))
    c.close()
    c.close()                                                    # idempotent
    assert not any(t.name == "xds-client-loop" for t in threading.enumerate() if t.ident not in before)
    with pytest.raises(RuntimeError, match="closed"):
        c.model_info()
    with pytest.raises(ValueError, match="at least one endpoint"):
        SyncInferenceClient([])
    assert not any(t.name == "xds-client-loop" for t in threading.enumerate() if t.ident not in before)
