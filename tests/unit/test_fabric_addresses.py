"""A restarted fabric simulator comes back on the same addresses (locally and under Compose)."""

from __future__ import annotations

import pytest

from fabric_sim.config import FabricConfig
from services.common.config import ConfigError, from_mapping
from services.pod.spec import COMPOSE_PORTS, address, fabric_config, pod_from_mapping


def test_local_admin_and_health_are_one_fixed_unix_socket_in_the_run_dir():
    spec = pod_from_mapping({"name": "p1", "run_dir": "/tmp/xds-p1"})
    admin = address(spec, "fabric", "fabric_admin")
    assert admin == "unix:/tmp/xds-p1/fabric.fabric-admin" == address(spec, "fabric", "health")
    cfg = fabric_config(spec)
    assert cfg["admin_unix"] == admin and cfg["data_address"] == "ipc:///tmp/xds-p1/fabric.fabric"
    assert from_mapping(FabricConfig, cfg).admin_unix == admin


def test_a_pinned_admin_port_keeps_tcp_and_compose_keeps_its_ports():
    spec = pod_from_mapping({"name": "p2", "fabric": {"admin_port": 7001}})
    assert address(spec, "fabric", "health") == "127.0.0.1:7001" and "admin_unix" not in fabric_config(spec)
    compose = pod_from_mapping({"name": "p3", "addressing": "compose"})
    assert address(compose, "fabric", "health") == f"fabric:{COMPOSE_PORTS['fabric_admin']}"
    assert fabric_config(compose)["admin_port"] == COMPOSE_PORTS["fabric_admin"]
    assert "admin_unix" not in fabric_config(compose)


def test_admin_unix_must_be_a_unix_address():
    with pytest.raises(ConfigError, match="admin_unix"):
        from_mapping(FabricConfig, {"admin_unix": "/tmp/x.sock"})
