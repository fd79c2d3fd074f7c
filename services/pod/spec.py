"""The pod spec: one YAML file describes a pod's topology; everything else is derived from it.

``services(spec)`` lists every service process (name, role, DP group, rank, emulated NPU) and
``address(spec, name, plane)`` is the single addressing rule: ipc sockets in ``run_dir`` and
127.0.0.1 ports under ``xds up`` (``addressing: local``), service names inside Docker Compose
(``addressing: compose``). The launcher, the compose generator and every service call these
two functions, so there is no second hand-kept list of addresses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.common.config import ConfigError, from_mapping, load_yaml

Role = Literal["fabric", "router", "prefill", "kvpool", "decode", "attention", "expert"]
Plane = Literal["rpc", "heartbeat", "grpc", "health", "fabric", "fabric_admin", "http", "metrics"]
GRPC_PLANES = ("grpc", "health")   # gRPC targets (host:port / unix:path); the rest are ZeroMQ
# host:port; http is the routers' OpenAI-compatible API, metrics every service's HTTP /metrics
HOST_PORT_PLANES = (*GRPC_PLANES, "http", "metrics")

# Fixed container ports under compose (each service is its own host there).
COMPOSE_PORTS = {"rpc": 5100, "heartbeat": 5101, "health": 5102, "grpc": 50051, "fabric": 5200, "fabric_admin": 5201,
                 "http": 8000, "metrics": 5103}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    preset: str = "tiny"
    seed: int = 0
    dir: str | None = None   # a model directory; None: made from preset+seed in the cache


@dataclass(frozen=True, slots=True)
class HeartbeatSpec:
    interval_s: float = 0.2
    suspect_after_s: float = 0.6
    # Peers declare a silent service dead after this; a service that finds itself silent for
    # longer (it was hung) ends and is restarted as a new incarnation (heartbeat.StaleIncarnation).
    dead_after_s: float = 1.5

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < self.suspect_after_s < self.dead_after_s:
            raise ConfigError("PodSpec.heartbeat", "needs 0 < interval_s < suspect_after_s < dead_after_s, got "
                              f"{self.interval_s}, {self.suspect_after_s}, {self.dead_after_s}")
        if self.dead_after_s <= 3 * self.interval_s:
            raise ConfigError("PodSpec.heartbeat.dead_after_s", "must exceed 3 * interval_s (a hung service "
                              "ends itself two intervals before its peers' dead-after window)")


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    # A request with no live backend (prefill or decode group dead or hung) waits this long
    # for one when the client set no deadline; with a deadline, until that deadline. (Busy
    # backends are not a reason to give up: requests wait in the queue below.)
    backend_wait_s: float = 30.0
    # Each router's admission queue: requests wait here, first come first served, until a
    # prefill and a DP group have room. Beyond it a new request is refused (RESOURCE_EXHAUSTED).
    max_waiting: int = 4096
    # A finished request is kept this long so a client that lost the tail can read it again.
    retain_finished_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_waiting < 1:
            raise ConfigError("PodSpec.routing.max_waiting", f"must be >= 1, got {self.max_waiting}")
        if self.backend_wait_s < 0 or self.retain_finished_s < 0:
            raise ConfigError("PodSpec.routing", "backend_wait_s and retain_finished_s must be >= 0")


@dataclass(frozen=True, slots=True)
class DecodeSpec:
    groups: int = 2                 # DP groups: one decode master each
    attention_per_group: int = 1
    max_batch: int = 16
    kv_blocks: int = 256            # KV capacity per group, in blocks of kv_pool.block_size


@dataclass(frozen=True, slots=True)
class ExpertSpec:
    instances: int = 4
    replicas: int = 2               # copies of every routed expert (on distinct instances)
    # An attention rank waits this long for one instance's answer to one attempt of an MoE
    # layer; then that instance counts as failed for the step and its rows go to a replica.
    answer_timeout_s: float = 2.0
    # With no live instance holding an expert a step needs: wait this long for one to come
    # back (a restart), then fail the step with UNAVAILABLE naming the expert.
    failover_wait_s: float = 10.0
    # An expert instance gives up an answer's put to a source that does not take it in this
    # time (that source is gone; the others wait meanwhile: answers go out in arrival order).
    answer_put_timeout_s: float = 2.0
    # Attention ranks send an expert's rows to its fastest, least-loaded live replica (EWMA of
    # answer latency + rows given); false: always the first live holder (benchmark baseline).
    replica_choice: bool = True


@dataclass(frozen=True, slots=True)
class KVPoolSpec:
    nodes: int = 1
    capacity_blocks: int = 1024
    block_size: int = 16
    lease_s: float = 10.0           # pins and write reservations of a client that went silent expire
    lookup_timeout_s: float = 0.5   # prefill's prefix lookup: a pool slower than this is a miss (and marked down)
    store_timeout_s: float = 1.0    # prefill's write of a sequence's KV into the pool (a cache copy)
    probe_interval_s: float = 0.25  # a node marked down is probed this often; requests skip it meanwhile
    staging_blocks: int = 256       # per prefill: KV staged for decode ranks (pool-layout blocks)
    staging_lease_s: float = 30.0   # an unacknowledged stage may be reclaimed after this (when room is needed)


@dataclass(frozen=True, slots=True)
class SupervisionSpec:
    """How ``xds up`` restarts a service that dies (``services/pod/supervisor.py``)."""
    restart: bool = True             # restart dead services; False: report them only
    backoff_initial_s: float = 0.1   # wait before the first restart of a streak; doubles per failure
    backoff_max_s: float = 5.0       # cap of that wait
    stable_after_s: float = 10.0     # ready this long before dying: backoff starts again from initial
    max_restarts: int = 5            # restarts of one service within window_s; one more exit gives up
    window_s: float = 60.0
    ready_timeout_s: float = 60.0    # a restart not ready by then is killed and counts as a failure


@dataclass(frozen=True, slots=True)
class PrefillBatchSpec:
    """One forward pass of a prefill service: waiting prompts are batched, first come first
    served, up to ``max_requests`` and ``max_tokens`` positions; a prompt that does not fit the
    token budget is computed in chunks over several passes (chunked prefill)."""
    max_requests: int = 8
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_tokens < 1:
            raise ConfigError("PodSpec.prefill_batch", f"max_requests and max_tokens must be >= 1, got "
                              f"{self.max_requests}, {self.max_tokens}")


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str = "xds"
    model: ModelSpec = field(default_factory=ModelSpec)
    routers: int = 2
    router_ports: tuple[int, ...] = ()   # local addressing; empty or 0 entries = pick free ports
    router_http_ports: tuple[int, ...] = ()   # the routers' OpenAI-compatible HTTP, the same way
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    prefill: int = 1
    prefill_batch: PrefillBatchSpec = field(default_factory=PrefillBatchSpec)
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    experts: ExpertSpec = field(default_factory=ExpertSpec)
    kv_pool: KVPoolSpec = field(default_factory=KVPoolSpec)
    heartbeat: HeartbeatSpec = field(default_factory=HeartbeatSpec)
    supervision: SupervisionSpec = field(default_factory=SupervisionSpec)
    fabric: dict[str, Any] = field(default_factory=dict)  # fabric_sim FabricConfig settings
    transport: Literal["shm", "tcp"] = "shm"
    addressing: Literal["local", "compose"] = "local"
    run_dir: str = ""                     # local: sockets + ready files; default /tmp/xds-<name>
    cache_dir: str = ""                   # model cache; default ~/.cache/xdeepserve

    def __post_init__(self) -> None:
        positive = {"routers": self.routers, "prefill": self.prefill, "decode.groups": self.decode.groups,
                    "decode.attention_per_group": self.decode.attention_per_group,
                    "decode.max_batch": self.decode.max_batch, "experts.instances": self.experts.instances,
                    "kv_pool.nodes": self.kv_pool.nodes, "kv_pool.block_size": self.kv_pool.block_size,
                    "kv_pool.staging_blocks": self.kv_pool.staging_blocks}
        for key, v in positive.items():
            if v < 1:
                raise ConfigError(f"PodSpec.{key}", "must be >= 1")
        for key, t in {"lease_s": self.kv_pool.lease_s, "lookup_timeout_s": self.kv_pool.lookup_timeout_s,
                       "store_timeout_s": self.kv_pool.store_timeout_s,
                       "probe_interval_s": self.kv_pool.probe_interval_s,
                       "staging_lease_s": self.kv_pool.staging_lease_s}.items():
            if not t > 0:
                raise ConfigError(f"PodSpec.kv_pool.{key}", "must be > 0")
        for key in ("answer_timeout_s", "answer_put_timeout_s"):
            if not getattr(self.experts, key) > 0:
                raise ConfigError(f"PodSpec.experts.{key}", "must be > 0 (seconds)")
        if not self.experts.failover_wait_s >= 0:
            raise ConfigError("PodSpec.experts.failover_wait_s", "must be >= 0 (seconds)")
        if not self.routing.backend_wait_s > 0:
            raise ConfigError("PodSpec.routing.backend_wait_s", "must be > 0 (seconds)")
        sup = self.supervision
        for key in ("backoff_initial_s", "backoff_max_s", "window_s", "ready_timeout_s"):
            if not getattr(sup, key) > 0:
                raise ConfigError(f"PodSpec.supervision.{key}", "must be > 0")
        if sup.stable_after_s < 0 or sup.max_restarts < 0:
            raise ConfigError("PodSpec.supervision", "stable_after_s and max_restarts must be >= 0")
        if sup.backoff_max_s < sup.backoff_initial_s:
            raise ConfigError("PodSpec.supervision.backoff_max_s", "must be >= backoff_initial_s")
        if not 1 <= self.experts.replicas <= self.experts.instances:
            raise ConfigError("PodSpec.experts.replicas", "must be in 1..experts.instances")
        if self.router_ports and len(self.router_ports) != self.routers:
            raise ConfigError("PodSpec.router_ports", f"needs {self.routers} entries (one per router)")
        if self.router_http_ports and len(self.router_http_ports) != self.routers:
            raise ConfigError("PodSpec.router_http_ports", f"needs {self.routers} entries (one per router)")
        if not self.name.replace("-", "").isalnum() or len(self.name) > 24:
            raise ConfigError("PodSpec.name", "letters, digits and '-' only, at most 24 characters")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"/tmp/xds-{self.name}")

    @property
    def namespace(self) -> str:
        """XCCL namespace: unique per run directory, so two pods never share segments."""
        return f"{self.name}-{hashlib.blake2b(str(self.run_path).encode(), digest_size=3).hexdigest()}"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    role: Role
    group: int = -1      # DP group (decode, attention)
    rank: int = 0        # index within its role (or within its group for attention)
    npu: int = 0         # emulated NPU in the fabric


def services(spec: PodSpec) -> list[ServiceSpec]:
    """Every process of the pod, in start order (dependencies first)."""
    out: list[ServiceSpec] = [ServiceSpec("fabric", "fabric")]
    npu = iter(range(1 << 20))
    out += [ServiceSpec(f"kvpool-{i}", "kvpool", rank=i, npu=next(npu)) for i in range(spec.kv_pool.nodes)]
    out += [ServiceSpec(f"expert-{i}", "expert", rank=i, npu=next(npu)) for i in range(spec.experts.instances)]
    for g in range(spec.decode.groups):
        out += [ServiceSpec(f"attention-{g}-{r}", "attention", group=g, rank=r, npu=next(npu))
                for r in range(spec.decode.attention_per_group)]
        out.append(ServiceSpec(f"decode-{g}", "decode", group=g, rank=g, npu=next(npu)))
    out += [ServiceSpec(f"prefill-{i}", "prefill", rank=i, npu=next(npu)) for i in range(spec.prefill)]
    out += [ServiceSpec(f"router-{i}", "router", rank=i) for i in range(spec.routers)]
    return out


def service(spec: PodSpec, name: str) -> ServiceSpec:
    for s in services(spec):
        if s.name == name:
            return s
    raise ConfigError("service", f"no service named {name!r} in pod {spec.name!r}")


def address(spec: PodSpec, name: str, plane: Plane) -> str:
    """The one addressing rule. gRPC planes, http and metrics give ``host:port`` (or
    ``unix:path``); the others ZeroMQ endpoints. The fabric's health service is on its admin
    (gRPC) server."""
    if name == "fabric" and plane in ("health", "fabric_admin") and spec.addressing != "compose":
        # Locally the admin (+ health) gRPC server is on a fixed unix socket, so a restarted
        # simulator comes back on the same address; a pod that pins admin_port keeps TCP.
        if spec.fabric.get("admin_port"):
            return f"{spec.fabric.get('admin_host', '127.0.0.1')}:{spec.fabric['admin_port']}"
        return f"unix:{spec.run_path}/fabric.fabric-admin"
    if name == "fabric" and plane == "health":
        return f"{name}:{COMPOSE_PORTS['fabric_admin']}"
    if spec.addressing == "compose":
        port = COMPOSE_PORTS[plane]
        return f"{name}:{port}" if plane in HOST_PORT_PLANES else f"tcp://{name}:{port}"
    if plane == "metrics":
        return "127.0.0.1:0"   # any free port; the service reports its real URL when ready
    if plane in ("grpc", "http"):
        i = service(spec, name).rank
        ports = spec.router_ports if plane == "grpc" else spec.router_http_ports
        return f"127.0.0.1:{ports[i] if ports else 0}"
    if plane == "health":
        return f"unix:{spec.run_path}/{name}.health"
    suffix = {"rpc": "rpc", "heartbeat": "hb", "fabric": "fabric", "fabric_admin": "fabric-admin"}[plane]
    return f"ipc://{spec.run_path}/{name}.{suffix}"


def bind_address(spec: PodSpec, name: str, plane: Plane) -> str:
    """Where the owner binds: all interfaces under compose, the same path locally."""
    a = address(spec, name, plane)
    if spec.addressing == "compose":
        return a.replace(f"//{name}:", "//*:") if a.startswith("tcp://") else a.replace(f"{name}:", "0.0.0.0:", 1)
    return a


def fabric_config(spec: PodSpec) -> dict[str, Any]:
    """The simulator's config: the pod's fabric settings + addresses from the pod's rule."""
    cfg = dict(spec.fabric)
    cfg["data_address"] = bind_address(spec, "fabric", "fabric")
    cfg["metrics_address"] = bind_address(spec, "fabric", "metrics")
    cfg["metrics_host"] = address(spec, "fabric", "metrics").rsplit(":", 1)[0]
    # The shared link table every XCCL client of the pod maps (one IPC namespace, also under
    # compose); named like an endpoint segment so the pod's sweep knows it. "" turns it off.
    cfg.setdefault("table_path", f"/dev/shm/xds.{spec.namespace}.fabric")
    if spec.addressing == "compose":
        cfg["admin_host"], cfg["admin_port"] = "0.0.0.0", COMPOSE_PORTS["fabric_admin"]
    elif not cfg.get("admin_port"):
        cfg["admin_unix"] = address(spec, "fabric", "fabric_admin")
    return cfg


def load_pod(file: str | Path | None) -> PodSpec:
    """The pod spec from a YAML file, or the built-in default pod when ``file`` is None."""
    return PodSpec() if file is None else load_yaml(PodSpec, file)


def pod_from_mapping(data: dict[str, Any]) -> PodSpec:
    return from_mapping(PodSpec, data)
