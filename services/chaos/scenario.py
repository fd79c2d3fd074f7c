"""The chaos scenario file: typed, frozen, unknown keys rejected by name (``common.config``).

A scenario is the load to run, the faults to inject and the checks that make the verdict.
Every rule a file can break is checked here, at load time, with an error that names the
setting (``ConfigError``); the runner never meets a scenario it cannot execute, except a
fault kind the pod does not support yet (``straggler``), which it refuses before starting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.common.config import ConfigError, from_mapping, load_yaml

Role = Literal["fabric", "router", "prefill", "kvpool", "decode", "attention", "expert"]
Kind = Literal["kill", "hang", "stop", "restart", "link_down", "latency", "bandwidth", "partition", "straggler"]
PROCESS_KINDS = ("kill", "hang", "stop", "restart")
LINK_KINDS = ("link_down", "latency", "bandwidth")
FABRIC_KINDS = (*LINK_KINDS, "partition")


@dataclass(frozen=True, slots=True)
class Target:
    """Which service(s): ``service`` names one exactly; otherwise ``role`` and/or ``group`` (a DP
    group: its decode master and attention ranks) select a set. A fault that acts on ONE
    service picks one member of the set with the scenario's seed (deterministic); a partition
    side takes the whole set."""
    service: str = ""
    role: Role | None = None
    group: int | None = None

    def __post_init__(self) -> None:
        if self.service and (self.role is not None or self.group is not None):
            raise ConfigError("Target.service", "names one service exactly: give it alone, without role/group")
        if not self.service and self.role is None and self.group is None:
            raise ConfigError("Target", "needs service, or role and/or group")
        if self.group is not None and self.group < 0:
            raise ConfigError("Target.group", "must be >= 0")

    def describe(self) -> str:
        if self.service:
            return self.service
        parts = [f"any {self.role}" if self.role else "any service"]
        if self.group is not None:
            parts.append(f"of DP group {self.group}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class PartitionSides:
    a: tuple[Target, ...]
    b: tuple[Target, ...]

    def __post_init__(self) -> None:
        if not self.a or not self.b:
            raise ConfigError("Fault.partition", "needs targets on both sides a and b")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: Kind
    # Trigger: exactly one of these. ``after_tokens``: once every stream in flight has that many
    # tokens (or ended). ``after_previous``: once the fault before this one has recovered.
    at_s: float | None = None
    after_tokens: int | None = None
    after_previous: bool = False
    delay_s: float = 0.0              # added to the trigger
    # How long it lasts, where that applies: hang (default 3 x the pod's heartbeat dead-after
    # window), fabric faults and straggler (default: until the load ends).
    duration_s: float | None = None
    target: Target | None = None                 # process faults, straggler
    between: tuple[Target, ...] = ()             # link faults: two services (A, B)
    links: tuple[str, ...] = ()                  # link faults: simulator link names instead
    partition: PartitionSides | None = None      # partition
    added_latency_us: float = 0.0                # latency
    bandwidth_factor: float = 0.0                # bandwidth: (0, 1), 0.1 = a tenth left
    delay_ms: float = 0.0                        # straggler
    per: Literal["step", "block"] = "step"       # straggler

    def validate(self, where: str) -> None:
        """Rules across fields; the scenario calls this with the fault's place in the file."""
        where = f"{where}({self.kind})"
        triggers = [self.at_s is not None, self.after_tokens is not None, self.after_previous]
        if sum(triggers) != 1:
            raise ConfigError(f"{where}", "needs exactly one trigger: at_s, after_tokens or after_previous")
        if self.at_s is not None and self.at_s < 0:
            raise ConfigError(f"{where}.at_s", "must be >= 0")
        if self.after_tokens is not None and self.after_tokens < 1:
            raise ConfigError(f"{where}.after_tokens", "must be >= 1")
        if self.delay_s < 0:
            raise ConfigError(f"{where}.delay_s", "must be >= 0")
        if self.duration_s is not None:
            if self.kind in ("kill", "stop", "restart"):
                raise ConfigError(f"{where}.duration_s", f"does not apply to {self.kind} (it is instantaneous)")
            if not self.duration_s > 0:
                raise ConfigError(f"{where}.duration_s", "must be > 0")
        allowed = {"kill": {"target"}, "hang": {"target"}, "stop": {"target"}, "restart": {"target"},
                   "link_down": {"between", "links"}, "latency": {"between", "links", "added_latency_us"},
                   "bandwidth": {"between", "links", "bandwidth_factor"}, "partition": {"partition"},
                   "straggler": {"target", "delay_ms", "per"}}[self.kind]
        given = {k for k, empty in (("target", None), ("between", ()), ("links", ()), ("partition", None),
                                    ("added_latency_us", 0.0), ("bandwidth_factor", 0.0), ("delay_ms", 0.0))
                 if getattr(self, k) != empty}
        if self.per != "step":
            given.add("per")
        extra = sorted(given - allowed)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}", f"does not apply to kind {self.kind!r} "
                              f"(it takes: {', '.join(sorted(allowed))})")
        if self.kind in PROCESS_KINDS or self.kind == "straggler":
            if self.target is None:
                raise ConfigError(f"{where}.target", "required")
        if self.kind in LINK_KINDS:
            if bool(self.between) == bool(self.links):
                raise ConfigError(f"{where}", "needs exactly one of between (two services) or links (link names)")
            if self.between and len(self.between) != 2:
                raise ConfigError(f"{where}.between", f"needs exactly two targets, got {len(self.between)}")
        if self.kind == "latency" and not self.added_latency_us > 0:
            raise ConfigError(f"{where}.added_latency_us", "required, > 0 (model microseconds)")
        if self.kind == "bandwidth" and not 0 < self.bandwidth_factor < 1:
            raise ConfigError(f"{where}.bandwidth_factor", "required, in (0, 1): the fraction of bandwidth left")
        if self.kind == "partition" and self.partition is None:
            raise ConfigError(f"{where}.partition", "required: {a: [targets], b: [targets]}")
        if self.kind == "straggler" and not self.delay_ms > 0:
            raise ConfigError(f"{where}.delay_ms", "required, > 0")


@dataclass(frozen=True, slots=True)
class Load:
    """Either ``streams`` concurrent requests started at once (closed), or ``rate_rps`` requests
    per second for ``duration_s`` (open). Prompts of ``prompt_bytes`` [min, max] bytes,
    ``max_tokens`` [min, max]; sampling greedy, seeded, or mixed (even greedy, odd seeded)."""
    streams: int = 0
    rate_rps: float = 0.0
    duration_s: float = 0.0
    prompt_bytes: tuple[int, int] = (1, 200)
    max_tokens: tuple[int, int] = (32, 64)
    sampling: Literal["greedy", "seeded", "mixed"] = "mixed"
    timeout_s: float = 120.0          # every request's deadline; also bounds the whole load
    # Open load only: keep issuing requests past duration_s until every fault is done
    # (recovered, or failed); the workload repeats from its first request.
    until_faults_done: bool = False

    def __post_init__(self) -> None:
        closed, opened = self.streams > 0, self.rate_rps > 0 or self.duration_s > 0
        if closed == opened:
            raise ConfigError("Load", "give either streams, or rate_rps and duration_s")
        if self.streams < 0:
            raise ConfigError("Load.streams", "must be >= 0")
        if closed and self.until_faults_done:
            raise ConfigError("Load.until_faults_done", "applies to an open load (rate_rps, duration_s) only")
        if opened and not (self.rate_rps > 0 and self.duration_s > 0):
            raise ConfigError("Load.rate_rps", "an open load needs rate_rps > 0 and duration_s > 0")
        for key in ("prompt_bytes", "max_tokens"):
            lo, hi = getattr(self, key)
            if not 1 <= lo <= hi:
                raise ConfigError(f"Load.{key}", f"needs 1 <= min <= max, got [{lo}, {hi}]")
        if not self.timeout_s > 0:
            raise ConfigError("Load.timeout_s", "must be > 0")


@dataclass(frozen=True, slots=True)
class Checks:
    max_errors: int = 0
    exact: bool = True                             # tokens equal the reference engine's
    max_recovery_s: float | None = None            # every fault's recovery_s at most this
    min_degraded_tokens_per_s: float | None = None  # tokens/s inside every fault's degraded window

    def __post_init__(self) -> None:
        if self.max_errors < 0:
            raise ConfigError("Checks.max_errors", "must be >= 0")
        for key in ("max_recovery_s", "min_degraded_tokens_per_s"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"Checks.{key}", "must be > 0 when given")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    load: Load
    description: str = ""
    seed: int = 0                      # workload and "any <role>" choices
    faults: tuple[Fault, ...] = ()
    checks: Checks = field(default_factory=Checks)
    settle_timeout_s: float = 60.0     # after the load: wait this long for faulted services to be back
    stall_s: float = 1.0               # a gap between two tokens of a stream longer than this is a stall

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("Scenario.name", "required")
        for i, f in enumerate(self.faults):
            f.validate(f"Scenario.faults[{i}]")
        if self.faults and self.faults[0].after_previous:
            raise ConfigError("Scenario.faults[0].after_previous", "the first fault has no previous one")
        for i, f in enumerate(self.faults):
            if f.after_tokens is not None and not self.load.streams:
                raise ConfigError(f"Scenario.faults[{i}].after_tokens", "needs a closed load (streams): in an "
                                  "open load new streams keep starting at 0 tokens; use at_s")
        if not self.stall_s > 0:
            raise ConfigError("Scenario.stall_s", "must be > 0")
        if not self.settle_timeout_s > 0:
            raise ConfigError("Scenario.settle_timeout_s", "must be > 0")


def load_scenario(file: str | Path) -> Scenario:
    return load_yaml(Scenario, file)


def scenario_from_mapping(data: dict[str, Any]) -> Scenario:
    return from_mapping(Scenario, data)
