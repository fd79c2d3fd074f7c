"""Fixtures shared by the XCCL p2p tests: endpoints of any kind, wired together, always closed.

``xnet`` yields a factory ``await xnet.open(name, **overrides)``; tcp endpoints learn each
other's (port-0) addresses, mem endpoints share one hub. At teardown every endpoint is
closed and no /dev/shm entry of the test's namespace may remain.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

import pytest

from xccl_net.endpoint import Endpoint, EndpointConfig, open_endpoint
from xccl_net.mem import MemoryHub

# "shm-filebell": shm with doorbell socket files in a directory (the containerised pod's mode).
KINDS = ["shm", "shm-filebell", "tcp", "mem"]
SMALL_GEOMETRY = dict(ring_slots=4, slot_bytes=4096)


def shm_entries(namespace: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f".{namespace}." in f]


class XNet:
    def __init__(self, kind: str, tmp_path: Any) -> None:
        self.kind = "shm" if kind == "shm-filebell" else kind
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        # Socket paths are limited to 107 bytes: a short directory of our own, not tmp_path.
        self.bell_dir = tempfile.mkdtemp(prefix="xb", dir="/tmp") if kind == "shm-filebell" else None
        self.hub = MemoryHub(seed=1234) if kind == "mem" else None
        self.eps: list[Endpoint] = []

    def config(self, name: str, **overrides: Any) -> EndpointConfig:
        base = dict(name=name, namespace=self.namespace, kind=self.kind, npu=len(self.eps),
                    windows={"kv": 64 * 1024}, poll_s=0.02, handshake_timeout_s=1.0,
                    bell_dir=self.bell_dir, **SMALL_GEOMETRY)
        base.update(overrides)
        return EndpointConfig(**base)

    async def open(self, name: str, *, fabric: Any = None, **overrides: Any) -> Endpoint:
        ep = await open_endpoint(self.config(name, **overrides), fabric=fabric, hub=self.hub)
        if self.kind == "tcp":
            for other in self.eps:
                other.set_peer_address(ep.name, ep.address)  # type: ignore[attr-defined]
                ep.set_peer_address(other.name, other.address)  # type: ignore[attr-defined]
        self.eps.append(ep)
        return ep

    async def close(self) -> None:
        for ep in self.eps:
            await ep.close()
        if self.bell_dir is not None:
            left = os.listdir(self.bell_dir)
            shutil.rmtree(self.bell_dir)
            assert left == [], f"closed endpoints left doorbell files: {left}"


@pytest.fixture(params=KINDS)
async def xnet(request, tmp_path):
    net = XNet(request.param, tmp_path)
    try:
        yield net
    finally:
        await net.close()
        assert shm_entries(net.namespace) == [], "an endpoint left its segment in /dev/shm"
