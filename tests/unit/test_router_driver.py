"""The router's retry driver as a pure policy: ``RouterCore.next_call`` and the outcomes fed
back (``prefill_answered``, ``admit_answered``, ``call_failed``), without sockets."""

from __future__ import annotations

import pytest

from services.common.status import Code
from services.model.sampling import SamplingParams
from services.router.core import (CallAdmit, CallPrefill, RouterConfig, RouterCore, RouterError, SendCancel, State,
                                  WaitBackend)

P = SamplingParams(max_tokens=8)
PROMPT = (256, 72, 105)
KV = object()   # the driver never looks into the KV reference: it only hands it on


def pod(prefills: int = 2, decodes: int = 2, **cfg) -> RouterCore:
    c = RouterCore(RouterConfig(**cfg))
    for i in range(prefills):
        c.observe_beat(f"prefill-{i}", "prefill", -1, f"p{i}", "serving", {"running": float(i)}, 0.0)
    for i in range(decodes):
        c.observe_beat(f"decode-{i}", "decode", i, f"d{i}", "serving",
                       {"running": float(i), "free_kv_blocks": 100.0 - i}, 0.0)
    return c


def opened(c: RouterCore, rid: str = "r1", deadline_s: float | None = None) -> None:
    c.open(rid, PROMPT, P, 0.0, deadline_s)
    c.attach(rid)


def test_happy_path_prefill_then_admit_then_nothing_left() -> None:
    c = pod()
    opened(c)
    assert c.next_call("r1", 0.1) == CallPrefill("r1", "prefill-0")
    assert c.requests["r1"].state is State.PREFILLING
    c.prefill_answered("r1", 10, KV, 0.2)
    call = c.next_call("r1", 0.2)
    assert call == CallAdmit("r1", "decode-0", KV) and c.requests["r1"].decode == "decode-0"
    c.admit_answered("r1", 0.3)
    assert c.next_call("r1", 0.3) is None


def test_a_retryable_refusal_tries_the_next_prefill_then_waits_for_a_beat() -> None:
    c = pod()
    opened(c)
    first = c.next_call("r1", 0.0)
    assert c.call_failed("r1", first, Code.RESOURCE_EXHAUSTED, "64 prefills wait", 0.1) == []
    second = c.next_call("r1", 0.1)
    assert second == CallPrefill("r1", "prefill-1")
    c.call_failed("r1", second, Code.UNAVAILABLE, "did not answer Prefill within 2s", 0.2, answered=False)
    wait = c.next_call("r1", 0.2)
    assert isinstance(wait, WaitBackend) and wait.wait_s == pytest.approx(30.0)
    assert "prefill-0: tried" in wait.why and "last error: prefill-1 did not answer Prefill" in wait.why
    # After the wait every prefill is worth another try.
    assert c.next_call("r1", 1.0) == CallPrefill("r1", "prefill-0")


def test_a_refusal_about_the_request_fails_it_at_once_with_its_code() -> None:
    c = pod()
    opened(c)
    call = c.next_call("r1", 0.0)
    with pytest.raises(RouterError) as ei:
        c.call_failed("r1", call, Code.INVALID_ARGUMENT, "bad sampling", 0.1)
    assert ei.value.code is Code.INVALID_ARGUMENT and ei.value.message == "prefill-0: bad sampling"


def test_internal_everywhere_is_not_waited_for() -> None:
    c = pod()
    opened(c)
    for _ in range(2):
        c.call_failed("r1", c.next_call("r1", 0.0), Code.INTERNAL, "forward pass failed", 0.1)
    with pytest.raises(RouterError) as ei:
        c.next_call("r1", 0.2)
    assert ei.value.code is Code.INTERNAL and "prefill-1: INTERNAL: forward pass failed" in ei.value.message


def test_an_unanswered_admit_is_cancelled_there_and_tried_elsewhere() -> None:
    c = pod()
    opened(c)
    c.next_call("r1", 0.0)
    c.prefill_answered("r1", 10, KV, 0.1)
    call = c.next_call("r1", 0.1)
    eff = c.call_failed("r1", call, Code.UNAVAILABLE, "did not answer Admit within 10s", 0.2, answered=False)
    assert eff == [SendCancel("decode-0", "r1")] and c.requests["r1"].decode == ""
    assert c.next_call("r1", 0.2) == CallAdmit("r1", "decode-1", KV)
    # A busy group refuses: no Cancel (it holds nothing); with none left, the KV waits.
    assert c.call_failed("r1", CallAdmit("r1", "decode-1", KV), Code.RESOURCE_EXHAUSTED, "queue full", 0.3) == []
    wait = c.next_call("r1", 0.3)
    assert isinstance(wait, WaitBackend) and "last error: decode-1: RESOURCE_EXHAUSTED: queue full" in wait.why


def test_with_no_backend_the_wait_ends_at_the_clients_deadline() -> None:
    c = pod(prefills=0, deadline_margin_s=0.25)
    opened(c, deadline_s=5.0)
    wait = c.next_call("r1", 1.0)
    assert isinstance(wait, WaitBackend) and wait.wait_s == pytest.approx(3.75)
    with pytest.raises(RouterError) as ei:
        c.next_call("r1", 4.8)
    assert ei.value.code is Code.DEADLINE_EXCEEDED and "no prefill service has been heard from" in ei.value.message


def test_a_replay_starts_the_driver_afresh() -> None:
    c = pod()
    opened(c)
    c.call_failed("r1", c.next_call("r1", 0.0), Code.UNAVAILABLE, "draining", 0.1)
    c.next_call("r1", 0.1)                               # prefill-1
    c.prefill_answered("r1", 10, KV, 0.2)
    c.next_call("r1", 0.2)                               # Admit to decode-0 ...
    c.admit_answered("r1", 0.3)
    c.restart("r1", "decode-0 is dead", 1.0)             # ... which then died
    req = c.requests["r1"]
    assert req.state is State.ADMITTED and not req.tried and req.last_error == "" and req.kv is None
    assert c.next_call("r1", 1.0) == CallPrefill("r1", "prefill-0")
