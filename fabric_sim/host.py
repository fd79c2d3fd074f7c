"""Can this host keep the emulated timing? Pure bookkeeping, fed by the server.

Rule (documented in README.md): the host keeps up when answering a data-plane batch plus
the worst event-loop lag stays under 10% of the smallest emulated path latency, and the
clients that report fidelity end their waits, on average, less than 10% of that latency
late. Otherwise the emulated timing is dominated by the host and ``note`` says by what.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric_sim.service import Fidelity

TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    keeps_up: bool
    service_mean_s: float
    service_max_s: float
    loop_lag_max_s: float
    min_emulated_latency_s: float
    client_waits: int
    client_late_mean_s: float
    client_late_max_s: float
    note: str


class HostMonitor:
    def __init__(self) -> None:
        self.batches = 0
        self.service_sum_s = 0.0
        self.service_max_s = 0.0
        self.loop_lag_max_s = 0.0

    def record_service(self, dt_s: float) -> None:
        self.batches += 1
        self.service_sum_s += dt_s
        self.service_max_s = max(self.service_max_s, dt_s)

    def record_loop_lag(self, lag_s: float) -> None:
        self.loop_lag_max_s = max(self.loop_lag_max_s, lag_s)

    def snapshot(self, min_latency_s: float, fidelity: dict[str, Fidelity]) -> HostSnapshot:
        mean = self.service_sum_s / self.batches if self.batches else 0.0
        waits = sum(f.waits for f in fidelity.values())
        late_mean = sum(f.late_sum_s for f in fidelity.values()) / waits if waits else 0.0
        late_max = max((f.late_max_s for f in fidelity.values()), default=0.0)
        budget = TOLERANCE * min_latency_s
        problems = []
        if mean + self.loop_lag_max_s > budget:
            problems.append(f"answering takes {mean * 1e6:.1f} us + loop lag {self.loop_lag_max_s * 1e6:.1f} us, "
                            f"over 10% of the smallest emulated latency {min_latency_s * 1e6:.2f} us")
        if waits and late_mean > budget:
            problems.append(f"clients end waits {late_mean * 1e6:.1f} us late on average")
        if problems:
            problems.append("raise time_scale so emulated latencies dwarf host overheads")
        return HostSnapshot(
            keeps_up=not problems, service_mean_s=mean, service_max_s=self.service_max_s,
            loop_lag_max_s=self.loop_lag_max_s, min_emulated_latency_s=min_latency_s,
            client_waits=waits, client_late_mean_s=late_mean, client_late_max_s=late_max,
            note="; ".join(problems) or "ok")
