"""Prometheus text exposition (format 0.0.4) of the simulator's state. Pure."""

from __future__ import annotations

import math

from fabric_sim.model import LinkTelemetry


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _esc(label: str) -> str:
    return label.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_LINK_METRICS = (
    ("xds_fabric_link_bytes_total", "counter", "Bytes reserved through the link.", lambda r: r.bytes),
    ("xds_fabric_link_transfers_total", "counter", "Transfers reserved through the link.", lambda r: r.transfers),
    ("xds_fabric_link_refusals_total", "counter", "Transfers refused because the link is down.",
     lambda r: r.refusals),
    ("xds_fabric_link_busy_seconds_total", "counter", "Wall seconds the link spent moving bytes.",
     lambda r: r.busy_s),
    ("xds_fabric_link_utilization_ratio", "gauge", "Busy time over uptime.", lambda r: r.utilization),
    ("xds_fabric_link_up", "gauge", "1 if the link is up.", lambda r: int(r.up)),
    ("xds_fabric_link_added_latency_us", "gauge", "Injected latency (model microseconds).",
     lambda r: r.added_latency_us),
    ("xds_fabric_link_bandwidth_factor", "gauge", "Injected bandwidth factor (1 = full).",
     lambda r: r.bandwidth_factor),
)


def render(*, links: list[LinkTelemetry], scalars: dict[str, tuple[str, str, float]]) -> str:
    """``scalars``: name -> (type, help, value). Links: only those given (see model)."""
    out: list[str] = []
    for name, (kind, help_, value) in scalars.items():
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
    for name, kind, help_, get in _LINK_METRICS:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for r in links:
            out.append(f'{name}{{link="{_esc(r.name)}",plane="{_esc(r.plane)}"}} {_num(get(r))}')
    return "\n".join(out) + "\n"
