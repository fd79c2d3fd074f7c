"""``xds compose [--pod FILE]``: the Docker Compose file of a pod, generated from its spec.

The same spec as ``xds up``; only the addressing mode changes (``addressing: compose``, service
names and fixed container ports, by ``spec.address``). Layout of the generated file:

- ``pod``: the namespace holder (``services.pod.holder``): owns the IPC namespace (``ipc:
  shareable``, ``shm_size`` for the XCCL segments) and the PID namespace the others join.
- ``fabric``, then every service of ``spec.services`` (same names as under ``xds up``), each
  ``python -m services.run --name NAME`` with the resolved spec in ``XDS_POD`` (JSON), a gRPC
  health check (``services/common/health.py``, a stdlib probe), ``restart: unless-stopped``
  and ``depends_on`` with ``condition: service_healthy``: the fabric first, routers last.
- the routers' gRPC and OpenAI-compatible HTTP ports published on 127.0.0.1 only
  (``XDS_ROUTER_<i>_PORT`` / ``XDS_ROUTER_<i>_HTTP_PORT`` to move them).
- model weights made once, at image build (``MODEL_PRESET``/``MODEL_SEED`` build args), read-only
  in the image; a spec with ``model.dir`` mounts that directory read-only instead.
- ``run``, a volume on ``/run/xds`` shared by all: doorbell sockets and ready files.
- profile ``observability``: ``prometheus`` (image built from Debian's package, docker/prometheus)
  scraping every service's ``/metrics`` (port ``COMPOSE_PORTS["metrics"]``) with the scrape
  config of ``services/pod/prometheus.py``; its UI/API on 127.0.0.1:9090 (``XDS_PROMETHEUS_PORT``).

Only what both Compose v2 and Debian's Compose 1.29.2 accept (see ../shared/DOCKER.md): no
top-level ``name``, short-form ports, no ``start_interval``. The output is deterministic, and a
test fails when the committed ``compose.yaml`` differs from ``xds compose``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from services.common.config import to_mapping
from services.pod.prometheus import compose_targets, scrape_config
from services.pod.spec import COMPOSE_PORTS, PodSpec, load_pod, services

IMAGE = "xdeepserve:local"
RUN_DIR = "/run/xds"                 # the shared volume (doorbells, ready files)
MODELS_DIR = "/opt/xds/models"       # weights made at build; Dockerfile writes the same path
HEALTH_SCRIPT = "/app/services/common/health.py"
HOLDER = "pod"
PROMETHEUS_IMAGE = "xdeepserve-prometheus:local"
PROMETHEUS_PORT = 9090
SCRAPE_INTERVAL_S = 2.0
# XCCL's default ring geometry (EndpointConfig): the segment of each endpoint holds one ring
# per possible peer. tmpfs charges only pages that are touched, so shm_size is a ceiling
# (no SIGBUS however busy the rings get), not memory set aside.
RING_BYTES = 64 * 256 * 1024
WINDOW_ALLOWANCE = 1 << 30
HEALTHCHECK = {"interval": "2s", "timeout": "3s", "retries": 5, "start_period": "120s"}


def container_spec(spec: PodSpec) -> PodSpec:
    """The spec as the containers see it: compose addressing, the shared run dir, the image's model."""
    model_dir = f"{MODELS_DIR}/{model_dir_name(spec)}"
    return dataclasses.replace(spec, addressing="compose", run_dir=RUN_DIR, cache_dir="", router_ports=(),
                               router_http_ports=(), model=dataclasses.replace(spec.model, dir=model_dir))


def model_dir_name(spec: PodSpec) -> str:
    if spec.model.dir:
        return Path(spec.model.dir).resolve().name
    return f"{spec.model.preset}-seed{spec.model.seed}"   # the name ensure_model gives it


def shm_size(spec: PodSpec) -> str:
    endpoints = [s for s in services(spec) if s.role not in ("fabric", "router")]
    max_peers = len(services(spec)) + 8                    # as ServiceRuntime sizes it
    total = len(endpoints) * max_peers * RING_BYTES + WINDOW_ALLOWANCE
    return f"{math.ceil(total / (1 << 30))}gb"


def router_port(spec: PodSpec, rank: int) -> int:
    return spec.router_ports[rank] if spec.router_ports and spec.router_ports[rank] else COMPOSE_PORTS["grpc"] + rank


def router_http_port(spec: PodSpec, rank: int) -> int:
    ports = spec.router_http_ports
    return ports[rank] if ports and ports[rank] else COMPOSE_PORTS["http"] + rank


def generate(spec: PodSpec) -> str:
    inner = container_spec(spec)
    pod_json = json.dumps(to_mapping(inner), sort_keys=True, separators=(",", ":")).replace("$", "$$")
    build = {"context": ".", "args": {"MODEL_PRESET": spec.model.preset, "MODEL_SEED": str(spec.model.seed)}}
    common: dict[str, Any] = {
        "image": IMAGE, "build": build,
        "environment": {"XDS_POD": pod_json, "XDS_LOG_FORMAT": "json"},
        "ipc": f"service:{HOLDER}", "pid": f"service:{HOLDER}",
        # Docker restarts with its own backoff; supervision.restart: false means no restart here too.
        "volumes": [f"run:{RUN_DIR}"], "restart": "unless-stopped" if spec.supervision.restart else "no",
        "stop_grace_period": "10s",
    }
    if spec.model.dir:
        common["volumes"].append(f"{Path(spec.model.dir).resolve()}:{inner.model.dir}:ro")
    holder = {"image": IMAGE, "build": build, "command": ["python", "-m", "services.pod.holder"],
              "ipc": "shareable", "shm_size": shm_size(spec), "restart": "unless-stopped",
              "stop_grace_period": "5s"}

    backends = [s.name for s in services(spec) if s.role in ("prefill", "decode")]
    out: dict[str, dict[str, Any]] = {}
    for s in services(spec):
        if s.role == "fabric":
            deps = {HOLDER: "service_started"}
            port = COMPOSE_PORTS["fabric_admin"]
        elif s.role == "router":
            deps = {HOLDER: "service_started", "fabric": "service_healthy", **dict.fromkeys(backends, "service_healthy")}
            port = COMPOSE_PORTS["health"]
        else:
            deps = {HOLDER: "service_started", "fabric": "service_healthy"}
            port = COMPOSE_PORTS["health"]
        svc: dict[str, Any] = {
            "command": ["python", "-m", "services.run", "--name", s.name],
            "depends_on": {d: {"condition": c} for d, c in deps.items()},
            "healthcheck": {"test": ["CMD", "python", "-S", HEALTH_SCRIPT, f"127.0.0.1:{port}"], **HEALTHCHECK},
        }
        if s.role == "router":
            var = f"XDS_ROUTER_{s.rank}_PORT"
            http_var = f"XDS_ROUTER_{s.rank}_HTTP_PORT"
            svc["ports"] = [f"127.0.0.1:${{{var}:-{router_port(spec, s.rank)}}}:{COMPOSE_PORTS['grpc']}",
                            f"127.0.0.1:${{{http_var}:-{router_http_port(spec, s.rank)}}}:{COMPOSE_PORTS['http']}"]
        out[s.name] = svc

    def block(data: dict[str, Any], indent: int) -> str:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=10_000)
        return "".join(" " * indent + line + "\n" for line in text.splitlines())

    parts = [
        "# Generated by `xds compose` from the pod spec; do not edit by hand. Change the spec and run\n"
        "#   xds compose [--pod FILE] > compose.yaml\n"
        "# (tests/unit/test_compose.py fails when this file is stale). Works with `docker compose`\n"
        "# and with Debian's `docker-compose` 1.29.2. Routers: gRPC 127.0.0.1:50051 and :50052, OpenAI\n"
        "# HTTP http://127.0.0.1:8000 and :8001 by default (XDS_ROUTER_<i>_PORT and\n"
        "# XDS_ROUTER_<i>_HTTP_PORT move them); set COMPOSE_PROJECT_NAME to run several pods.\n",
        "x-xds: &xds\n" + block(common, 2),
        "services:\n",
        f"  {HOLDER}:\n" + block(holder, 4),
    ]
    for name, svc in out.items():
        parts.append(f"  {name}:\n    <<: *xds\n" + block(svc, 4))
    parts.append("  prometheus:\n" + block(prometheus_service(inner), 4))
    parts.append("volumes:\n  run: {}\n")
    return "".join(parts)


def prometheus_service(inner: PodSpec) -> dict[str, Any]:
    """Profile ``observability``: Prometheus scraping every service (compose addressing)."""
    config = scrape_config(compose_targets(inner), interval_s=SCRAPE_INTERVAL_S).replace("$", "$$")
    return {
        "image": PROMETHEUS_IMAGE, "build": {"context": "docker/prometheus"}, "profiles": ["observability"],
        "environment": {"PROMETHEUS_CONFIG": config},
        # The config comes from the environment (generated, never a hand-kept file in the image).
        "command": ["sh", "-c", 'printf "%s" "$$PROMETHEUS_CONFIG" > /prometheus/prometheus.yml && exec prometheus '
                    "--config.file=/prometheus/prometheus.yml --storage.tsdb.path=/prometheus/data "
                    f"--web.listen-address=0.0.0.0:{PROMETHEUS_PORT}"],
        "ports": [f"127.0.0.1:${{XDS_PROMETHEUS_PORT:-{PROMETHEUS_PORT}}}:{PROMETHEUS_PORT}"],
        "restart": "unless-stopped", "stop_grace_period": "5s",
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pod", default=None, help="pod spec YAML (default: the built-in default pod)")


def run(args: argparse.Namespace) -> int:
    print(generate(load_pod(args.pod)), end="")
    return 0
