"""Pods for integration tests: the launcher's ``Pod`` in a short temporary directory, plus an
XCCL endpoint for the test process to play a service. One mechanism for starting, restarting and
stopping services by PID, shared with ``xds up``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from services.pod.launcher import Pod
from services.pod.spec import PodSpec, address, pod_from_mapping, service
from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.fabric_client import FabricClient
from xccl_net.layout import segment_name


class TestPod(Pod):
    """Stopping also asserts that no shared memory was left behind (but by services we
    SIGKILLed and did not restart), and removes the directory (``XDS_KEEP_TEST_DIRS=1`` keeps it)."""

    __test__ = False  # not a test class

    def __init__(self, spec: PodSpec, root: Path) -> None:
        super().__init__(spec)
        self.root = root

    @classmethod
    def create(cls, prefix: str, settings: dict[str, Any] | None = None) -> TestPod:
        root = Path(tempfile.mkdtemp(prefix="xds-", dir="/tmp"))   # ipc paths must stay short
        try:
            spec = pod_from_mapping({"name": f"{prefix}{uuid.uuid4().hex[:6]}", "run_dir": str(root / "run"),
                                     **(settings or {})})
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(spec, root)

    @classmethod
    @contextlib.contextmanager
    def running(cls, prefix: str, settings: dict[str, Any] | None = None, *, timeout_s: float = 90.0,
                supervise: bool = False) -> Iterator[TestPod]:
        """A started pod (supervised when asked), stopped on exit: what a test's pod fixture does."""
        pod = cls.create(prefix, settings)
        try:
            pod.start(timeout_s=timeout_s)
            if supervise:
                pod.supervise()
            yield pod
        finally:
            pod.stop()

    def stop(self, grace_s: float = 5.0) -> dict[str, int]:
        codes = super().stop(grace_s)
        allowed = {segment_name(self.spec.namespace, n) for n in self.killed}
        leaked = sorted(set(self.swept) - allowed)
        if not os.environ.get("XDS_KEEP_TEST_DIRS"):
            shutil.rmtree(self.root, ignore_errors=True)
        assert not leaked, f"shared memory left behind: {leaked}"
        return codes


@contextlib.asynccontextmanager
async def test_endpoint(spec: PodSpec, name: str) -> AsyncIterator[Any]:
    """An XCCL endpoint in the test process, playing the pod service ``name``."""
    me = service(spec, name)
    fabric = await FabricClient.connect(address(spec, "fabric", "fabric"), name=name, npu=me.npu, timeout_s=10)
    try:
        ep = await open_endpoint(EndpointConfig(name=name, namespace=spec.namespace, kind=spec.transport, npu=me.npu,
                                                bell_dir=str(spec.run_path)), fabric=fabric)
        try:
            yield ep
        finally:
            await ep.close()
    finally:
        await fabric.close()


test_endpoint.__test__ = False  # a helper, not a test
