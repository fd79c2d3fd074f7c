"""A restarted router or fabric simulator comes back at the address its clients know: the
launcher fixes free ports once, in the resolved spec, under local addressing."""

from __future__ import annotations

import pytest

from services.client.sdk import InferenceClient
from services.common.health import probe
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from tests.faults import crash
from tests.pods import TestPod

pytestmark = pytest.mark.integration


@pytest.fixture
def pod():
    with TestPod.running("addr", {"decode": {"groups": 1}, "experts": {"instances": 2, "replicas": 2}}) as p:
        yield p


async def test_router_and_fabric_restart_on_their_ports(pod) -> None:
    routers, admin = list(pod.routers), pod.fabric_admin
    assert all(not r.endswith(":0") for r in routers) and pod.spec.router_ports == tuple(
        int(r.rsplit(":", 1)[1]) for r in routers)
    for name in ("router-0", "fabric"):
        old = pod.procs[name]
        assert crash(old) == -9
        pod.start_service(name)
        assert pod.procs[name].pid != old.pid
    assert pod.routers == routers and pod.fabric_admin == admin
    assert probe(admin) == "SERVING" and probe(routers[0]) == "SERVING"
    want = ReferenceEngine.from_dir(pod.model_dir).generate(
        [GenerationRequest("r", tuple(encode("same address")), SamplingParams(max_tokens=8))])[0].token_ids
    async with InferenceClient(routers[:1]) as client:     # the restarted router, at its old port
        assert (await client.complete("same address", max_tokens=8)).token_ids == want
