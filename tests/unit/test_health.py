"""The stdlib health probe against grpcio's real health service, over TCP and unix sockets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import services.common.health as health_mod
from services.common.health import HealthProbeError, HealthServer, probe

SCRIPT = Path(health_mod.__file__)


async def _probe(*args):
    return await asyncio.get_running_loop().run_in_executor(None, probe, *args)


async def test_probe_reports_not_serving_then_serving_over_unix_socket(tmp_path):
    server = HealthServer(f"unix:{tmp_path}/h.sock")
    await server.start()
    try:
        assert await _probe(f"unix:{tmp_path}/h.sock") == "NOT_SERVING"
        await server.set(True)
        assert await _probe(f"unix://{tmp_path}/h.sock") == "SERVING"
        await server.set(False)
        assert await _probe(f"unix:{tmp_path}/h.sock") == "NOT_SERVING"
        with pytest.raises(HealthProbeError, match="Check call failed"):
            await _probe(f"unix:{tmp_path}/h.sock", "no.such.Service")   # grpc answers NOT_FOUND
    finally:
        await server.stop()
    with pytest.raises(HealthProbeError):
        await _probe(f"unix:{tmp_path}/h.sock")


async def test_probe_over_tcp_and_the_script_exit_codes(unused_tcp_port):
    addr = f"127.0.0.1:{unused_tcp_port}"
    server = HealthServer(addr)
    await server.start()
    try:
        # As Docker runs it: a bare interpreter (-S: no site-packages), exit 0 only when SERVING.
        cmd = [sys.executable, "-S", str(SCRIPT), addr]
        not_yet = await _run(cmd)
        assert (not_yet.returncode, not_yet.stdout.strip()) == (1, "NOT_SERVING")
        await server.set(True)
        ok = await _run(cmd)
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    finally:
        await server.stop()
    gone = await _run(cmd)
    assert gone.returncode == 1 and "unhealthy" in gone.stderr
    usage = await _run([sys.executable, "-S", str(SCRIPT)])
    assert usage.returncode == 2


async def _run(cmd):
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=20))


def test_bad_address_is_a_clear_error():
    with pytest.raises(HealthProbeError, match="host:port or unix:/path"):
        probe("no-port-here")
