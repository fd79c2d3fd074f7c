"""The generated compose file: committed copy not stale, derived from the spec, 1.29.2-safe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from services.pod.compose import HOLDER, RUN_DIR, generate
from services.pod.spec import COMPOSE_PORTS, address, load_pod, pod_from_mapping, services

ROOT = Path(__file__).resolve().parents[2]


def test_committed_compose_yaml_is_what_xds_compose_prints():
    out = subprocess.run([sys.executable, "-m", "services.cli", "compose"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out == generate(load_pod(None))
    assert (ROOT / "compose.yaml").read_text() == out, "compose.yaml is stale: run `xds compose > compose.yaml`"


def _load(text: str) -> dict:
    return yaml.safe_load(text)   # PyYAML resolves the `<<: *xds` merges as Compose does


def test_every_pod_service_is_a_compose_service_with_health_and_ordered_dependencies():
    spec = load_pod(None)
    doc = _load(generate(spec))
    svcs = doc["services"]
    assert set(svcs) == {HOLDER, "prometheus"} | {s.name for s in services(spec)}
    assert svcs[HOLDER]["ipc"] == "shareable" and svcs[HOLDER]["shm_size"].endswith("gb")
    for s in services(spec):
        c = svcs[s.name]
        assert c["command"] == ["python", "-m", "services.run", "--name", s.name]
        assert (c["ipc"], c["pid"]) == (f"service:{HOLDER}", f"service:{HOLDER}")
        assert f"run:{RUN_DIR}" in c["volumes"] and c["restart"] == "unless-stopped"
        probe = c["healthcheck"]["test"]
        assert probe[:4] == ["CMD", "python", "-S", "/app/services/common/health.py"]
        port = COMPOSE_PORTS["fabric_admin" if s.role == "fabric" else "health"]
        assert probe[4] == f"127.0.0.1:{port}"
        deps = c["depends_on"]
        assert deps[HOLDER] == {"condition": "service_started"}
        if s.role != "fabric":
            assert deps["fabric"] == {"condition": "service_healthy"}
        if s.role == "router":
            assert {n for n, d in deps.items() if d["condition"] == "service_healthy"} >= {"prefill-0", "decode-0", "decode-1"}
            assert c["ports"] == [f"127.0.0.1:${{XDS_ROUTER_{s.rank}_PORT:-{50051 + s.rank}}}:50051",
                                  f"127.0.0.1:${{XDS_ROUTER_{s.rank}_HTTP_PORT:-{8000 + s.rank}}}:8000"]
        else:
            assert "ports" not in c   # only the routers are published, on 127.0.0.1


def test_the_containers_spec_is_the_pods_spec_with_compose_addressing():
    spec = pod_from_mapping({"name": "p", "decode": {"groups": 3}, "experts": {"instances": 2, "replicas": 1}})
    doc = _load(generate(spec))
    inner = pod_from_mapping(json.loads(doc["services"]["router-0"]["environment"]["XDS_POD"]))
    assert (inner.addressing, inner.run_dir, inner.decode.groups, inner.experts.instances) == ("compose", RUN_DIR, 3, 2)
    assert inner.model.dir == "/opt/xds/models/tiny-seed0"
    # The one addressing rule names compose services: every address points at a service we emit.
    for s in services(inner):
        for plane in ("rpc", "heartbeat", "health", "metrics"):
            host = address(inner, s.name, plane).removeprefix("tcp://").rsplit(":", 1)[0]
            assert host in doc["services"]
    assert set(doc["services"]) >= {"decode-2", "attention-2-0"} and "expert-2" not in doc["services"]


def test_a_model_directory_in_the_spec_is_mounted_read_only(tmp_path):
    (tmp_path / "mymodel").mkdir()
    doc = _load(generate(pod_from_mapping({"model": {"dir": str(tmp_path / "mymodel")}})))
    c = doc["services"]["expert-0"]
    assert f"{tmp_path / 'mymodel'}:/opt/xds/models/mymodel:ro" in c["volumes"]
    assert json.loads(c["environment"]["XDS_POD"])["model"]["dir"] == "/opt/xds/models/mymodel"


def test_only_what_compose_1_29_accepts():
    doc = _load(generate(load_pod(None)))
    assert not {"name", "include"} & set(doc), "1.29.2 rejects top-level name/include"
    for svc in doc["services"].values():
        assert not {"develop", "gpus"} & set(svc)
        assert "start_interval" not in svc.get("healthcheck", {})
        for port in svc.get("ports", []):
            assert isinstance(port, str)  # short form only (no long form with host_ip)
        for dep in svc.get("depends_on", {}).values():
            assert set(dep) == {"condition"}   # no restart/required


def test_the_holder_exits_at_once_on_sigterm():
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "services.pod.holder"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "pod holder: ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


def test_observability_profile_scrapes_every_service_by_its_compose_metrics_address():
    spec = pod_from_mapping({"name": "p", "decode": {"groups": 3}})
    doc = _load(generate(spec))
    prom = doc["services"]["prometheus"]
    assert prom["profiles"] == ["observability"] and prom["build"] == {"context": "docker/prometheus"}
    assert prom["ports"] == ["127.0.0.1:${XDS_PROMETHEUS_PORT:-9090}:9090"]
    cfg = yaml.safe_load(prom["environment"]["PROMETHEUS_CONFIG"])
    (job,) = cfg["scrape_configs"]
    got = {c["labels"]["service"]: c["targets"] for c in job["static_configs"]}
    assert got == {s.name: [f"{s.name}:{COMPOSE_PORTS['metrics']}"] for s in services(spec)}
    assert "$$PROMETHEUS_CONFIG" in prom["command"][2]   # compose's escape: the shell sees $PROMETHEUS_CONFIG
    assert (ROOT / "docker/prometheus/Dockerfile").is_file()
