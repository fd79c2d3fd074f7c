"""The simulator's state as Prometheus metric families (``xds:fabric_*``), collected at scrape
time by ``services.common.metrics`` (the pod's one exporter): per-link bytes, transfers,
refusals, busy time, utilisation and fault state, the data-plane counters, and the fidelity
figures (does the host keep the emulated timing?). Pure: reads a snapshot, keeps nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fabric_sim.model import LinkTelemetry

_LABELS = ("link", "plane")
# (name, counter?, help, value). Counters are named without "_total" (the family adds it).
_LINK_METRICS: tuple[tuple[str, bool, str, Callable[[LinkTelemetry], float]], ...] = (
    ("xds:fabric_link_bytes", True, "Bytes reserved through the link.", lambda r: r.bytes),
    ("xds:fabric_link_transfers", True, "Transfers reserved through the link.", lambda r: r.transfers),
    ("xds:fabric_link_refusals", True, "Transfers refused because the link is down.", lambda r: r.refusals),
    ("xds:fabric_link_busy_seconds", True, "Wall seconds the link spent moving bytes.", lambda r: r.busy_s),
    ("xds:fabric_link_utilization_ratio", False, "Busy time over uptime.", lambda r: r.utilization),
    ("xds:fabric_link_up", False, "1 if the link is up (0: a fault took it down).", lambda r: int(r.up)),
    ("xds:fabric_link_added_latency_seconds", False, "Injected latency (model seconds).",
     lambda r: r.added_latency_us * 1e-6),
    ("xds:fabric_link_bandwidth_factor", False, "Injected bandwidth factor (1 = full).", lambda r: r.bandwidth_factor),
)


def families(*, links: Iterable[LinkTelemetry], counters: Any, host: Any, uptime_s: float, time_scale: float,
             clients: int, active_faults: int) -> list[Metric]:
    """``counters``: the data plane's (requests, grants, refusals, bad_*); ``host``: a
    ``HostSnapshot`` (the fidelity figures)."""
    links = list(links)
    out: list[Metric] = []
    for name, is_counter, help_, get in _LINK_METRICS:
        fam = (CounterMetricFamily if is_counter else GaugeMetricFamily)(name, help_, labels=_LABELS)
        for r in links:
            fam.add_metric([r.name, r.plane], float(get(r)))
        out.append(fam)
    for name, help_, v in (
            ("xds:fabric_requests", "Data-plane messages received.", counters.requests),
            ("xds:fabric_grants", "Reservations granted.", counters.grants),
            ("xds:fabric_refusals", "Reservations refused by a fault.", counters.refusals),
            ("xds:fabric_bad_messages", "Undecodable data-plane messages.", counters.bad_messages),
            ("xds:fabric_bad_requests", "Impossible data-plane requests.", counters.bad_requests),
            ("xds:fabric_client_waits", "Client waits reported for the fidelity figures.", host.client_waits)):
        out.append(CounterMetricFamily(name, help_, value=float(v)))
    for name, help_, v in (
            ("xds:fabric_uptime_seconds", "Seconds since the simulator started.", uptime_s),
            ("xds:fabric_time_scale", "Wall seconds per model second.", time_scale),
            ("xds:fabric_registered_clients", "Clients registered.", clients),
            ("xds:fabric_active_faults", "Faulted links plus partitions.", active_faults),
            ("xds:fabric_host_keeps_up", "1 if the host keeps the emulated timing (fidelity).", int(host.keeps_up)),
            ("xds:fabric_service_mean_seconds", "Mean time to answer a data-plane batch.", host.service_mean_s),
            ("xds:fabric_service_max_seconds", "Worst time to answer a data-plane batch.", host.service_max_s),
            ("xds:fabric_loop_lag_max_seconds", "Worst event-loop lag.", host.loop_lag_max_s),
            ("xds:fabric_min_emulated_latency_seconds", "Smallest emulated link latency (the fidelity budget's "
             "base).", host.min_emulated_latency_s),
            ("xds:fabric_client_late_mean_seconds", "How late clients end their waits, on average.",
             host.client_late_mean_s),
            ("xds:fabric_client_late_max_seconds", "How late clients end their waits, at worst.",
             host.client_late_max_s)):
        out.append(GaugeMetricFamily(name, help_, value=float(v)))
    return out
