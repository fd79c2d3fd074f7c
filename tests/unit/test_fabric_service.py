"""Data-plane handling without sockets: frames in, typed replies out; host-keeps-up rule."""

from __future__ import annotations

import msgpack
import pytest

from fabric_sim.config import FabricConfig
from fabric_sim.host import HostMonitor
from fabric_sim.model import FabricModel
from fabric_sim.protocol import (BAD_MESSAGE, BAD_REQUEST, Failed, FidelityReport, Granted, Refused, Register,
                                 Registered, Reserve)
from fabric_sim.service import Fidelity, FabricService
from services.common.config import from_mapping
from services.common.wire import decode, encode


def service() -> FabricService:
    cfg = from_mapping(FabricConfig, {"servers": 2, "npus_per_server": 2, "ub_bandwidth_gbps": 100.0})
    return FabricService(FabricModel(cfg, now=0.0), epoch="E1")


def replies(svc: FabricService, messages: list[list[bytes]], now: float = 0.0):
    return [(ident, decode(frames)) for ident, frames in svc.handle_batch(messages, now)]


def test_register_and_reserve_replies_carry_epoch_and_req_id():
    svc = service()
    out = replies(svc, [[b"a", *encode(Register(7, "att0", 1))]])
    assert out == [(b"a", Registered(7, "E1", 1, 4, 1.0))]
    out = replies(svc, [[b"a", *encode(Reserve(8, 1, 0, 1_000_000, "ub"))],
                        [b"b", *encode(Reserve(9, 0, 1, 1_000_000, "ub"))]])
    assert [(i, type(m), m.req_id, m.epoch) for i, m in out] == [(b"a", Granted, 8, "E1"), (b"b", Granted, 9, "E1")]
    assert svc.clients[b"a"].name == "att0" and svc.counters.grants == 2


def test_batch_is_simultaneous_shared_link():
    svc = service()
    out = replies(svc, [[b"a", *encode(Reserve(1, 0, 1, 1_000_000, "ub"))],
                        [b"a", *encode(Reserve(2, 0, 1, 1_000_000, "ub"))]])
    d1, d2 = (m.delay_s for _, m in out)
    assert d1 == pytest.approx(d2)  # fair share: both end together, at twice the lone time
    alone = replies(service(), [[b"a", *encode(Reserve(1, 0, 1, 1_000_000, "ub"))]])[0][1].delay_s
    assert d1 - alone == pytest.approx(10e-6)


def test_refusal_names_link():
    svc = service()
    svc.model.set_link_state("npu1.rx", up=False)
    [(_, m)] = replies(svc, [[b"a", *encode(Reserve(3, 0, 1, 10, "ub"))]])
    assert isinstance(m, Refused) and m.link == "npu1.rx" and m.req_id == 3


@pytest.mark.parametrize("frames", [
    [b"\xc1"], [b""], [msgpack.packb({"t": "fabric.granted", "v": 1, "f": {}, "a": []})],
    [msgpack.packb([1, 2, 3])], [msgpack.packb({"t": "x", "v": 1, "f": {}, "a": []}), b"extra"],
    [msgpack.packb({"t": "fabric.reserve", "v": 1, "f": {"req_id": 1, "src_npu": 0, "dst_npu": 1,
                                                        "nbytes": 1.5, "plane": "ub"}, "a": []})],
])
def test_garbage_gets_bad_message_reply_and_later_requests_still_work(frames):
    svc = service()
    out = replies(svc, [[b"z", *frames], [b"a", *encode(Reserve(4, 0, 1, 10, "ub"))]])
    assert isinstance(out[0][1], Failed) and out[0][1].code == BAD_MESSAGE and out[0][1].req_id == -1
    assert isinstance(out[1][1], Granted) and out[1][1].req_id == 4
    assert svc.counters.bad_messages == 1


def test_identity_without_body_is_counted_not_fatal():
    svc = service()
    out = replies(svc, [[b"z"]])
    assert isinstance(out[0][1], Failed) and svc.counters.bad_messages == 1


def test_impossible_requests_get_bad_request_with_req_id():
    svc = service()
    out = replies(svc, [[b"a", *encode(Reserve(5, 0, 77, 10, "ub"))],
                        [b"a", *encode(Register(6, "x", -1))],
                        [b"a", *encode(Reserve(7, 0, 1, 10, "carrier-pigeon"))]])
    assert [(m.req_id, m.code) for _, m in out] == [(6, BAD_REQUEST), (5, BAD_REQUEST), (7, BAD_REQUEST)]


def test_fidelity_reports_feed_host_verdict():
    svc = service()
    svc.handle_batch([[b"a", *encode(FidelityReport("c", 0, 10, 10 * 50e-6, 80e-6))]], 0.0)
    assert svc.counters.fidelity["c@npu0"] == Fidelity(10, pytest.approx(500e-6), 80e-6)
    host = HostMonitor()
    host.record_service(5e-6)
    slow = host.snapshot(min_latency_s=1.1e-6, fidelity=svc.counters.fidelity)
    assert not slow.keeps_up and "late" in slow.note and "time_scale" in slow.note
    fast = host.snapshot(min_latency_s=1.1e-3, fidelity=svc.counters.fidelity)
    assert fast.keeps_up and fast.client_late_mean_s == pytest.approx(50e-6) and fast.note == "ok"
