from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.model.cache import ensure_model
from services.pod.spec import PodSpec, address, bind_address, load_pod, pod_from_mapping, service, services


def test_default_pod_has_every_role_with_unique_names_and_npus() -> None:
    spec = PodSpec()
    svcs = services(spec)
    roles = [s.role for s in svcs]
    assert roles.count("router") == 2 and roles.count("decode") == 2 and roles.count("expert") == 4
    assert roles.count("attention") == 2 and roles.count("prefill") == 1 and roles.count("kvpool") == 1
    assert len({s.name for s in svcs}) == len(svcs)
    placed = [s.npu for s in svcs if s.role not in ("router", "fabric")]
    assert len(set(placed)) == len(placed)
    assert service(spec, "attention-1-0").group == 1


def test_one_addressing_rule_for_local_and_compose(tmp_path) -> None:
    local = pod_from_mapping({"run_dir": str(tmp_path), "router_ports": [7001, 7002],
                              "router_http_ports": [8101, 8102]})
    assert address(local, "decode-0", "rpc") == f"ipc://{tmp_path}/decode-0.rpc"
    assert bind_address(local, "decode-0", "rpc") == address(local, "decode-0", "rpc")
    assert address(local, "router-1", "grpc") == "127.0.0.1:7002"
    assert address(local, "router-1", "http") == "127.0.0.1:8102"
    assert address(pod_from_mapping({"run_dir": str(tmp_path)}), "router-0", "http") == "127.0.0.1:0"
    compose = pod_from_mapping({"addressing": "compose"})
    assert address(compose, "decode-0", "rpc") == "tcp://decode-0:5100"
    assert bind_address(compose, "decode-0", "rpc") == "tcp://*:5100"
    assert address(compose, "router-0", "grpc") == "router-0:50051"
    assert address(compose, "router-1", "http") == "router-1:8000"
    assert bind_address(compose, "router-1", "http") == "0.0.0.0:8000"
    assert local.namespace != pod_from_mapping({"run_dir": str(tmp_path / "other")}).namespace


@pytest.mark.parametrize("data, key", [
    ({"routers": 0}, "routers"), ({"experts": {"instances": 2, "replicas": 3}}, "experts.replicas"),
    ({"router_ports": [1]}, "router_ports"), ({"router_http_ports": [1]}, "router_http_ports"),
    ({"decode": {"grups": 2}}, "decode.grups"),
    ({"name": "bad name!"}, "name"), ({"transport": "rdma"}, "transport"),
    ({"heartbeat": {"interval_s": 0.5, "suspect_after_s": 0.4}}, "heartbeat"),
    ({"heartbeat": {"interval_s": 0.4, "suspect_after_s": 0.6, "dead_after_s": 1.0}}, "heartbeat.dead_after_s"),
])
def test_bad_specs_name_the_setting(data, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pod_from_mapping(data)


def test_yaml_and_unknown_service(tmp_path) -> None:
    f = tmp_path / "pod.yaml"
    f.write_text("name: mini\nrouters: 1\ndecode:\n  groups: 1\n")
    spec = load_pod(f)
    assert spec.routers == 1 and load_pod(None) == PodSpec()
    with pytest.raises(ConfigError, match="decode-7"):
        service(spec, "decode-7")


def test_model_cache_is_made_once_and_reused(tmp_path) -> None:
    d = ensure_model(None, "tiny", 3, str(tmp_path))
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(None, "tiny", 3, str(tmp_path)) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError):
        ensure_model(str(tmp_path / "nope"), "tiny", 0)
