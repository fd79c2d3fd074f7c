"""The pure link model: timing, contention, faults, telemetry (no sockets, injected clock)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric_sim.config import FabricConfig
from fabric_sim.fluid import fluid_finish_times, max_min_rates
from fabric_sim.model import FabricModel, FaultError, Grant, Refusal, Rejected, TransferRequest
from services.common.config import ConfigError, from_mapping

US = 1e-6
MB = 1_000_000
# 2 servers x 2 NPUs: npu0, npu1 on srv0; npu2, npu3 on srv1. 100 GB/s ports -> 1 MB = 10 us.
SMALL = dict(servers=2, npus_per_server=2, ub_bandwidth_gbps=100.0, ub_hop_latency_us=1.0,
             l1_latency_us=2.0, l2_latency_us=3.0, roce_bandwidth_gbps=10.0, roce_latency_us=10.0)
SAME_LAT = (1 + 2 + 1) * US
CROSS_LAT = (1 + 2 + 3 + 3 + 2 + 1) * US


def model(**over) -> FabricModel:
    return FabricModel(from_mapping(FabricConfig, {**SMALL, **over}), now=0.0)


def grant(outcome) -> Grant:
    assert isinstance(outcome, Grant), outcome
    return outcome


def test_single_transfer_is_latency_plus_bytes_over_bandwidth():
    m = model()
    g = grant(m.reserve(TransferRequest(0, 1, MB), now=0.0))
    assert g.delay_s == pytest.approx(SAME_LAT + 10 * US)
    assert g.queue_s == 0 and g.latency_s == pytest.approx(SAME_LAT)


def test_same_server_and_cross_server_latency_differ():
    m = model()
    same = grant(m.reserve(TransferRequest(0, 1, 0), now=0.0))
    cross = grant(m.reserve(TransferRequest(0, 2, 0), now=0.0))
    assert same.delay_s == pytest.approx(SAME_LAT)
    assert cross.delay_s == pytest.approx(CROSS_LAT)
    assert cross.delay_s > same.delay_s


def test_roce_plane_is_separate_and_slower():
    m = model()
    g = grant(m.reserve(TransferRequest(0, 2, MB, "roce"), now=0.0))
    assert g.delay_s == pytest.approx(10 * US + 100 * US)  # 1 MB at 10 GB/s
    # RoCE traffic does not consume UB links.
    ub = grant(m.reserve(TransferRequest(0, 2, MB), now=0.0))
    assert ub.delay_s == pytest.approx(CROSS_LAT + 10 * US)


def test_two_transfers_reserved_together_share_the_link():
    alone = grant(model().reserve(TransferRequest(0, 1, MB), now=0.0))
    m = model()
    a, b = map(grant, m.reserve_batch([TransferRequest(0, 1, MB), TransferRequest(0, 2, MB)], now=0.0))
    # both through npu0.tx at 50 GB/s each: both later than alone, the pair takes the sum.
    assert a.delay_s > alone.delay_s and b.delay_s - CROSS_LAT > alone.delay_s - SAME_LAT
    assert a.delay_s - SAME_LAT == pytest.approx(20 * US)
    assert b.delay_s - CROSS_LAT == pytest.approx(20 * US)


def test_transfers_reserved_one_after_another_queue_fifo_same_total():
    m = model()
    a = grant(m.reserve(TransferRequest(0, 1, MB), now=0.0))
    b = grant(m.reserve(TransferRequest(0, 1, MB), now=0.0))
    assert a.delay_s == pytest.approx(SAME_LAT + 10 * US)
    assert b.delay_s == pytest.approx(SAME_LAT + 20 * US) and b.queue_s == pytest.approx(10 * US)
    # Once the link has drained, a new transfer is alone again.
    c = grant(m.reserve(TransferRequest(0, 1, MB), now=1.0))
    assert c.delay_s == pytest.approx(SAME_LAT + 10 * US)


def test_disjoint_paths_do_not_interfere():
    m = model()
    a, b = map(grant, m.reserve_batch([TransferRequest(0, 1, MB), TransferRequest(2, 3, MB)], now=0.0))
    assert a.delay_s == pytest.approx(SAME_LAT + 10 * US)
    assert b.delay_s == pytest.approx(SAME_LAT + 10 * US)


def test_fat_shared_switch_does_not_slow_flows_bottlenecked_elsewhere():
    # srv0.l1 is non-blocking (200 GB/s): 0->1 and 1->0 cross it together at full port speed.
    m = model()
    a, b = map(grant, m.reserve_batch([TransferRequest(0, 1, MB), TransferRequest(1, 0, MB)], now=0.0))
    assert a.delay_s == pytest.approx(SAME_LAT + 10 * US)
    assert b.delay_s == pytest.approx(SAME_LAT + 10 * US)
    # With a blocking L1 (100 GB/s) they share it.
    m = model(l1_bandwidth_gbps=100.0)
    a, b = map(grant, m.reserve_batch([TransferRequest(0, 1, MB), TransferRequest(1, 0, MB)], now=0.0))
    assert a.delay_s == pytest.approx(SAME_LAT + 20 * US)


def test_time_scale_scales_every_duration():
    base = grant(model().reserve(TransferRequest(0, 2, MB), now=0.0))
    scaled = grant(model(time_scale=1000.0).reserve(TransferRequest(0, 2, MB), now=0.0))
    assert scaled.delay_s == pytest.approx(base.delay_s * 1000)
    assert scaled.latency_s == pytest.approx(base.latency_s * 1000)


def test_link_down_refuses_naming_the_link_and_heal_restores():
    m = model()
    m.set_link_state("npu0.tx", up=False)
    r = m.reserve(TransferRequest(0, 2, MB), now=0.0)
    assert isinstance(r, Refusal) and r.link == "npu0.tx"
    grant(m.reserve(TransferRequest(1, 0, MB), now=0.0))  # the other direction is another link
    m.set_link_state("npu0.tx", up=True)
    grant(m.reserve(TransferRequest(0, 2, MB), now=0.0))
    m.set_link_state("srv1.down", up=False)
    assert m.reserve(TransferRequest(0, 3, 1), now=0.0) == Refusal("srv1.down", "link srv1.down is down")
    m.clear_faults()
    grant(m.reserve(TransferRequest(0, 3, 1), now=0.0))
    assert m.active_faults == 0


def test_partition_refuses_both_directions_only_across():
    m = model()
    pid = m.partition([0], [2, 3])
    for src, dst in ((0, 2), (3, 0)):
        r = m.reserve(TransferRequest(src, dst, 1), now=0.0)
        assert isinstance(r, Refusal) and r.link == pid
    grant(m.reserve(TransferRequest(0, 1, 1), now=0.0))
    grant(m.reserve(TransferRequest(2, 3, 1), now=0.0))
    assert [p.id for p in m.partitions()] == [pid]
    m.clear_faults()
    grant(m.reserve(TransferRequest(0, 2, 1), now=0.0))


def test_healing_one_partition_leaves_every_other_fault():
    m = model()
    first, second = m.partition([0], [2]), m.partition([1], [3])
    m.set_link_state("npu0.tx", up=False)
    m.heal_partition(first)
    assert [p.id for p in m.partitions()] == [second] and m.active_faults == 2
    assert isinstance(m.reserve(TransferRequest(1, 3, 1), now=0.0), Refusal)
    grant(m.reserve(TransferRequest(2, 0, 1), now=0.0))   # cut by the healed partition only (npu0.rx is up)
    with pytest.raises(FaultError, match="no partition 'partition#1'"):
        m.heal_partition(first)


def test_bandwidth_cut_slows_transfer_proportionally():
    m = model()
    m.set_link_bandwidth("npu0.tx", 0.25)
    g = grant(m.reserve(TransferRequest(0, 1, MB), now=0.0))
    assert g.delay_s - SAME_LAT == pytest.approx(40 * US)


def test_added_latency_adds_to_the_path():
    m = model()
    m.set_link_latency("srv0.l1", 5.0)
    g = grant(m.reserve(TransferRequest(0, 1, 0), now=0.0))
    assert g.delay_s == pytest.approx(SAME_LAT + 5 * US)
    g = grant(m.reserve(TransferRequest(2, 3, 0), now=0.0))
    assert g.delay_s == pytest.approx(SAME_LAT)


def test_bad_fault_requests_are_typed_errors():
    m = model()
    with pytest.raises(FaultError, match="unknown link 'npu9.tx'"):
        m.set_link_state("npu9.tx", up=False)
    for bad in (0.0, -1.0, 1.5, float("nan")):
        with pytest.raises(FaultError, match="factor"):
            m.set_link_bandwidth("npu0.tx", bad)
    with pytest.raises(FaultError, match="added_latency_us"):
        m.set_link_latency("npu0.tx", -1.0)
    with pytest.raises(FaultError, match="overlap"):
        m.partition([0, 1], [1])
    with pytest.raises(FaultError, match="out of range"):
        m.partition([0], [7])
    with pytest.raises(FaultError, match="non-empty"):
        m.partition([], [1])
    assert m.active_faults == 0


def test_bad_transfer_requests_are_rejected_not_raised():
    m = model()
    outs = m.reserve_batch([TransferRequest(0, 9, 1), TransferRequest(0, 1, -5),
                            TransferRequest(0, 1, 1, "nvlink"), TransferRequest(0, 1, MB)], now=0.0)
    assert [type(o) for o in outs] == [Rejected, Rejected, Rejected, Grant]
    assert "out of range" in outs[0].reason and "nbytes" in outs[1].reason and "plane" in outs[2].reason


def test_telemetry_sums_bytes_and_busy_time():
    m = model()
    m.reserve_batch([TransferRequest(0, 1, MB), TransferRequest(0, 2, 3 * MB)], now=0.0)
    m.reserve(TransferRequest(1, 0, 2 * MB), now=0.0)
    rows = {r.name: r for r in m.link_telemetry(now=1e-3)}
    assert rows["npu0.tx"].bytes == 4 * MB and rows["npu0.tx"].transfers == 2
    assert rows["npu0.tx"].busy_s == pytest.approx(40 * US)
    assert rows["npu0.tx"].utilization == pytest.approx(40 * US / 1e-3)
    assert rows["srv0.l1"].bytes == 6 * MB and rows["srv0.l1"].transfers == 3
    assert rows["srv0.up"].bytes == 3 * MB and rows["npu2.rx"].bytes == 3 * MB
    assert "npu3.tx" not in rows  # idle, unfaulted links are left out unless asked for
    assert len(m.link_telemetry(now=1e-3, all_links=True)) == len(m.topo.links)
    m.set_link_state("npu3.tx", up=False)
    r = m.reserve(TransferRequest(3, 0, 1), now=0.0)
    rows = {r.name: r for r in m.link_telemetry(now=1e-3)}
    assert isinstance(r, Refusal) and rows["npu3.tx"].refusals == 1 and rows["npu3.tx"].up is False


def test_config_rejects_unknown_and_bad_keys():
    with pytest.raises(ConfigError, match="ub_bandwith_gbps"):
        from_mapping(FabricConfig, {"ub_bandwith_gbps": 1.0})
    with pytest.raises(ConfigError, match="time_scale"):
        from_mapping(FabricConfig, {"time_scale": 0})
    assert from_mapping(FabricConfig, {}).npus == 384


def test_max_min_rates_textbook_example():
    # link 0 cap 10 shared by flows 0,1; link 1 cap 4 used by flow 1 only -> flow1=4, flow0=6.
    rates = max_min_rates([0, 1], [[0], [0, 1]], {0: 10.0, 1: 4.0})
    assert rates == {0: pytest.approx(6.0), 1: pytest.approx(4.0)}


def test_fluid_late_starter_shares_then_runs_alone():
    # cap 1 B/s; flow 0 (2 B) starts at 0, flow 1 (1 B) at 1: [0,1] f0 alone (1 B left),
    # [1,3] both at 0.5 -> both done at 3.
    assert fluid_finish_times([0.0, 1.0], [2.0, 1.0], [[0], [0]], {0: 1.0}) == [
        pytest.approx(3.0), pytest.approx(3.0)]


requests = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 4 * MB)),
                    min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(batch=requests)
def test_contention_never_beats_alone_and_conserves_work(batch):
    reqs = [TransferRequest(s, d, n) for s, d, n in batch]
    m = model()
    outs = [grant(o) for o in m.reserve_batch(reqs, now=0.0)]
    again = model().reserve_batch(reqs, now=0.0)
    assert outs == again  # deterministic
    for r, g in zip(reqs, outs):
        alone = grant(model().reserve(r, now=0.0))
        assert g.delay_s >= alone.delay_s * (1 - 1e-9)
    # The last transfer leaving each NPU port cannot finish before that port's work is done.
    for src in range(4):
        sent = sum(r.nbytes for r in reqs if r.src == src and r.dst != src)
        ends = [g.finish_at - g.latency_s for r, g in zip(reqs, outs) if r.src == src and r.dst != src]
        if sent:
            assert max(ends) >= sent / 100e9 * (1 - 1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3 * MB),
                          st.sampled_from(["ub", "roce"]), st.floats(0, 50e-6)), min_size=1, max_size=30),
       st.sampled_from([None, "npu1.rx", "srv0.up"]))
def test_reserve_alone_is_a_batch_of_one(reqs, down):
    """``reserve`` (the shared table's per-transfer path) answers and books exactly what
    ``reserve_batch([req])`` does, grants and refusals, in any sequence."""
    a, b = model(l2_bandwidth_gbps=150.0), model(l2_bandwidth_gbps=150.0)
    if down:
        a.set_link_state(down, False)
        b.set_link_state(down, False)
    now = 0.0
    for src, dst, nbytes, plane, dt in reqs:
        now += dt
        r = TransferRequest(src, dst, nbytes, plane)
        assert a.reserve(r, now) == b.reserve_batch([r], now)[0]
    for x, y in zip(a.link_telemetry(now, all_links=True), b.link_telemetry(now, all_links=True)):
        assert x == y
