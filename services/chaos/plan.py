"""Pure planning: the workload, the faults resolved against a pod, and what each fault touches.

No sockets, no clocks: ``plan(scenario, pod_services, heartbeat_dead_after_s)`` turns targets
("any expert", "DP group 0") into service names, NPUs and simulator link names, choosing with
``random.Random(scenario.seed)`` so a scenario means the same services on every run against
the same pod shape. ``workload(scenario)`` is the list of requests, equally deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.chaos.scenario import Fault, Scenario, Target
from services.common.config import ConfigError
from services.pod.spec import ServiceSpec

WORDS = ("expert", "token", "router", "prefill", "decode", "attention", "fabric", "SuperPod", "MoE", "cache",
         "shard", "ränk", "✓", "0123", "bus", "a", "the", "of", ", ", ". ")


@dataclass(frozen=True, slots=True)
class RequestPlan:
    index: int
    prompt: str
    max_tokens: int
    sampling: dict            # SamplingParams keywords beyond max_tokens (empty: greedy)
    start_s: float            # offset from the load's start (0 for a closed load)

    @property
    def kwargs(self) -> dict:
        return {"max_tokens": self.max_tokens, **self.sampling}


@dataclass(frozen=True, slots=True)
class PlannedFault:
    index: int
    fault: Fault
    services: tuple[str, ...] = ()       # process faults, straggler: one; partition: both sides
    side_a: tuple[str, ...] = ()         # partition side a / link "between" A
    side_b: tuple[str, ...] = ()
    npus_a: tuple[int, ...] = ()
    npus_b: tuple[int, ...] = ()
    links: tuple[str, ...] = ()          # simulator links a link fault sets
    pair_cut: bool = False               # link_down between two services = a two-NPU partition
    duration_s: float | None = None      # resolved: hang default, None = until the load ends

    @property
    def label(self) -> str:
        f = self.fault
        if f.kind == "partition":
            return f"#{self.index} partition {'+'.join(self.side_a)} | {'+'.join(self.side_b)}"
        if self.side_a:
            return f"#{self.index} {f.kind} {self.side_a[0]}<->{self.side_b[0]}"
        if self.links:
            return f"#{self.index} {f.kind} {','.join(self.links)}"
        return f"#{self.index} {f.kind} {self.services[0]}"


@dataclass(frozen=True, slots=True)
class Plan:
    scenario: Scenario
    requests: tuple[RequestPlan, ...]
    faults: tuple[PlannedFault, ...] = field(default_factory=tuple)


def _prompt(rng: random.Random, n_bytes: int) -> str:
    out = ""
    while len(out.encode()) < n_bytes:
        out += rng.choice(WORDS)
    raw = out.encode()[:n_bytes]
    return raw.decode("utf-8", errors="ignore") or "a"


def workload(scenario: Scenario) -> tuple[RequestPlan, ...]:
    load = scenario.load
    rng = random.Random(f"workload-{scenario.seed}")
    n = load.streams or max(1, round(load.rate_rps * load.duration_s))
    out = []
    for i in range(n):
        prompt = _prompt(rng, rng.randint(*load.prompt_bytes))
        max_tokens = rng.randint(*load.max_tokens)
        seeded = load.sampling == "seeded" or (load.sampling == "mixed" and i % 2 == 1)
        sampling = ({"temperature": round(rng.uniform(0.5, 1.0), 2), "top_p": 0.9, "top_k": rng.choice([0, 20, 40]),
                     "seed": scenario.seed * 100_000 + i} if seeded else {})
        start = 0.0 if load.streams else i / load.rate_rps
        out.append(RequestPlan(i, prompt, max_tokens, sampling, start))
    return tuple(out)


def matches(t: Target, s: ServiceSpec) -> bool:
    if t.service:
        return s.name == t.service
    return (t.role is None or s.role == t.role) and (t.group is None or s.group == t.group)


def select(pod: Sequence[ServiceSpec], t: Target, where: str) -> list[ServiceSpec]:
    found = [s for s in pod if matches(t, s)]
    if not found:
        raise ConfigError(where, f"no service of this pod is {t.describe()} "
                          f"(services: {', '.join(s.name for s in pod)})")
    return found


def pick(pod: Sequence[ServiceSpec], t: Target, rng: random.Random, where: str) -> ServiceSpec:
    found = select(pod, t, where)
    return found[0] if t.service else rng.choice(found)


def plan(scenario: Scenario, pod: Sequence[ServiceSpec], dead_after_s: float) -> Plan:
    """Resolve every fault against the pod's services. ``ConfigError`` names the fault whose
    target the pod does not have (or that no simulator link can express)."""
    rng = random.Random(f"targets-{scenario.seed}")
    out = []
    for i, f in enumerate(scenario.faults):
        where = f"faults[{i}]({f.kind})"
        duration = f.duration_s
        if f.kind == "hang" and duration is None:
            duration = 3 * dead_after_s   # as the chaos suite: held past the peers' dead-after window
        if f.target is not None:
            s = pick(pod, f.target, rng, f"{where}.target")
            if f.kind == "straggler" and s.role != "expert":
                raise ConfigError(f"{where}.target", f"a straggler must be an expert instance, got {s.name}")
            out.append(PlannedFault(i, f, services=(s.name,), duration_s=duration))
        elif f.kind == "partition":
            assert f.partition is not None
            a = sorted({s.name: s for t in f.partition.a for s in select(pod, t, f"{where}.partition.a")}.values(),
                       key=lambda s: s.npu)
            b = sorted({s.name: s for t in f.partition.b for s in select(pod, t, f"{where}.partition.b")}.values(),
                       key=lambda s: s.npu)
            _fabric_members(a + b, f"{where}.partition")
            both = {s.name for s in a} & {s.name for s in b}
            if both:
                raise ConfigError(f"{where}.partition", f"{sorted(both)} on both sides")
            out.append(PlannedFault(i, f, services=tuple(s.name for s in a + b), side_a=tuple(s.name for s in a),
                                    side_b=tuple(s.name for s in b), npus_a=tuple(s.npu for s in a),
                                    npus_b=tuple(s.npu for s in b), duration_s=duration))
        elif f.between:
            sa = pick(pod, f.between[0], rng, f"{where}.between[0]")
            sb = pick(pod, f.between[1], rng, f"{where}.between[1]")
            _fabric_members([sa, sb], f"{where}.between")
            if sa.npu == sb.npu:
                raise ConfigError(f"{where}.between", f"{sa.name} and {sb.name} share NPU {sa.npu}: no link between them")
            if f.kind == "link_down":
                # The simulator models ports, not pairs: a pair's own cut is a two-NPU partition.
                out.append(PlannedFault(i, f, services=(sa.name, sb.name), side_a=(sa.name,), side_b=(sb.name,),
                                        npus_a=(sa.npu,), npus_b=(sb.npu,), pair_cut=True, duration_s=duration))
            else:
                # Timing faults on the pair's NPU ports, both directions (A's and B's tx and rx).
                links = (f"npu{sa.npu}.tx", f"npu{sb.npu}.rx", f"npu{sb.npu}.tx", f"npu{sa.npu}.rx")
                out.append(PlannedFault(i, f, services=(sa.name, sb.name), side_a=(sa.name,), side_b=(sb.name,),
                                        npus_a=(sa.npu,), npus_b=(sb.npu,), links=links, duration_s=duration))
        else:
            out.append(PlannedFault(i, f, links=tuple(f.links), duration_s=duration))
    return Plan(scenario, workload(scenario), tuple(out))


def _fabric_members(members: Sequence[ServiceSpec], where: str) -> None:
    off = [s.name for s in members if s.role in ("fabric", "router")]
    if off:
        raise ConfigError(where, f"{off} have no NPU in the fabric (routers and the simulator talk gRPC/ZeroMQ)")
