"""The failure vocabulary: codes, the refusal that carries one, the retry policy, the wire."""

from __future__ import annotations

import ast
import pathlib

import grpc
import pytest

from services.common.rpc import Failed, RemoteError
from services.common.status import RETRY_ELSEWHERE, RETRYABLE, Code, Refused, retry_elsewhere, retryable
from services.common.wire import FieldError, decode, encode
from services.protocol.inference import Tokens
from services.router.core import NoBackend, RouterError
from services.router.service import grpc_code


def test_codes_are_grpc_codes_by_name() -> None:
    assert {c.name for c in Code} == {s.name for s in grpc.StatusCode}
    for c in Code:
        assert c.value == c.name and grpc_code(c) is grpc.StatusCode[c.name]
    assert grpc_code("UNAVAILABLE") is grpc.StatusCode.UNAVAILABLE   # a plain string of a code, too
    with pytest.raises(ValueError):
        grpc_code("NOT_A_CODE")


def test_retry_policy_is_decided_here() -> None:
    assert {c for c in Code if retryable(c)} == RETRYABLE == {Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED}
    assert {c for c in Code if retry_elsewhere(c)} == RETRY_ELSEWHERE == RETRYABLE | {Code.INTERNAL}
    for about_the_request in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.DEADLINE_EXCEEDED, Code.CANCELLED):
        assert not retryable(about_the_request) and not retry_elsewhere(about_the_request)


def test_refused_carries_a_typed_code_and_the_human_message() -> None:
    exc = Refused("RESOURCE_EXHAUSTED", "queue full")
    assert exc.code is Code.RESOURCE_EXHAUSTED and exc.message == "queue full" and exc.retryable
    assert str(exc) == "RESOURCE_EXHAUSTED: queue full"
    with pytest.raises(ValueError):
        Refused("NOPE", "x")
    with pytest.raises(ValueError):
        Refused(Code.OK, "a refusal that is not one")
    # The RPC client's and the router's refusals are the same kind of thing.
    assert isinstance(RemoteError(Code.NOT_FOUND, "gone"), Refused)
    assert isinstance(NoBackend("none alive"), Refused) and NoBackend("none alive").code is Code.UNAVAILABLE
    assert RouterError("late", Code.DEADLINE_EXCEEDED).code is Code.DEADLINE_EXCEEDED
    assert RouterError("bug").code is Code.INTERNAL


def test_codes_travel_typed_on_the_wire() -> None:
    assert decode(encode(Failed(Code.UNAVAILABLE, "draining"))) == Failed(Code.UNAVAILABLE, "draining")
    t = Tokens("r", 3, (), "error", "attention rank a0 died", Code.UNAVAILABLE)
    back = decode(encode(t))
    assert back == t and back.code is Code.UNAVAILABLE and back.error == "attention rank a0 died"
    assert decode(encode(Tokens("r", 0, (5,)))).code is Code.OK          # the default: no error
    with pytest.raises(FieldError):
        encode(Failed("UNAVAILABLE", "an untyped string code"))         # type: ignore[arg-type]


def test_status_module_is_free_of_zmq_and_grpc() -> None:
    import services.common.status as status
    tree = ast.parse(pathlib.Path(status.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "enum"}
