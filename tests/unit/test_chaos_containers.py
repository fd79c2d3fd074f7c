"""The pure half of `xds chaos run --compose`: reading `docker inspect`, judging a crash and a
return, and the host-side addresses of a compose-addressed pod. No Docker here."""

from __future__ import annotations

import dataclasses

import pytest

from services.chaos.containers import ContainerState, back, crash_seen, host_address
from services.chaos.faults import FaultNotInjected
from services.pod.spec import address, load_pod

# A trimmed real record (docker 20.10, compose 1.29.2).
INSPECT = {
    "Id": "0fc5dd08b101",
    "RestartCount": 1,
    "State": {"Status": "running", "Running": True, "Paused": False, "Pid": 29950, "ExitCode": 0,
              "Health": {"Status": "healthy"}},
    "Config": {"Labels": {"com.docker.compose.project": "p1", "com.docker.compose.service": "expert-1"},
               "Env": ["PATH=/usr/bin", 'XDS_POD={"addressing":"compose"}', "EMPTY="]},
    "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.9"}, "p1_default": {"IPAddress": "172.18.0.8"}},
                        "Ports": {"50051/tcp": [{"HostIp": "127.0.0.1", "HostPort": "50052"}], "8000/tcp": None,
                                  "5100/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1234"}]}},
}


def test_inspect_record_is_read_into_the_judged_fields():
    s = ContainerState.from_inspect(INSPECT)
    assert (s.id, s.service, s.pid, s.running, s.paused, s.restart_count, s.health) == \
        ("0fc5dd08b101", "expert-1", 29950, True, False, 1, "healthy")
    assert s.ip == "172.18.0.8"           # the project's network, not another one
    assert s.published == {"50051/tcp": "127.0.0.1:50052", "5100/tcp": "127.0.0.1:1234"}
    assert s.env["XDS_POD"] == '{"addressing":"compose"}' and s.env["EMPTY"] == ""
    assert "running, pid 29950, RestartCount 1, healthy" == s.describe()


def test_a_stopped_container_reads_as_exited():
    rec = {**INSPECT, "State": {"Running": False, "Pid": 0, "ExitCode": 137}, "NetworkSettings": {}}
    s = ContainerState.from_inspect(rec)
    assert not s.running and s.pid == 0 and s.ip == "" and s.health == ""
    assert s.describe().startswith("exited (137)")


def test_crash_is_seen_as_exit_or_restart_and_back_needs_a_healthy_new_incarnation():
    before = ContainerState.from_inspect(INSPECT)
    assert not crash_seen(before, before)
    exited = dataclasses.replace(before, running=False, pid=0, exit_code=137)
    assert crash_seen(before, exited) and not back(before, exited, restarted=True)
    starting = dataclasses.replace(before, pid=31000, restart_count=2, health="starting")
    assert crash_seen(before, starting) and not back(before, starting, restarted=True)
    healthy = dataclasses.replace(starting, health="healthy")
    assert back(before, healthy, restarted=True)
    # docker start after docker stop does not count a restart: a new PID is the proof there.
    started = dataclasses.replace(before, pid=31000)
    assert back(before, started, restarted=False) and not back(before, started, restarted=True)
    assert not back(before, dataclasses.replace(started, paused=True), restarted=False)
    assert back(before, dataclasses.replace(started, health=""), restarted=False)   # no healthcheck


def test_compose_addresses_are_rewritten_to_container_addresses():
    spec = dataclasses.replace(load_pod(None), addressing="compose")
    ips = {"expert-0": "172.18.0.5", "fabric": "172.18.0.3"}
    assert host_address(address(spec, "expert-0", "heartbeat"), ips) == "tcp://172.18.0.5:5101"
    assert host_address(address(spec, "expert-0", "rpc"), ips) == "tcp://172.18.0.5:5100"
    # The fabric's admin API (gRPC) is reached at its health plane's host:port.
    assert host_address(address(spec, "fabric", "health"), ips) == "172.18.0.3:5201"
    with pytest.raises(FaultNotInjected, match="expert-9"):
        host_address(address(spec, "expert-9", "rpc"), ips)
