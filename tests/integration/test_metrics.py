"""Prometheus metrics of a real pod: every service's /metrics (URLs from the launcher's ready
info) parses, carries its own families, and the router's counters move by exactly what a few
requests (equal to the reference) did; then a real Prometheus server (Debian's binary) scrapes
every service and answers a PromQL query on the TTFT histogram.

One pod for the module (tiny preset, short heartbeats)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.client.sdk import InferenceClient
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.pod.prometheus import scrape_config
from services.pod.spec import services
from tests.pods import TestPod

pytestmark = pytest.mark.integration

OWN_FAMILY = {   # role -> a family only that role exposes
    "router": "xds:time_to_first_token_seconds", "decode": "xds:decode_kv_capacity_blocks",
    "attention": "xds:attention_a2e_seconds", "expert": "xds:expert_tokens", "kvpool": "xds:kvpool_capacity_blocks",
    "prefill": "xds:service_load", "fabric": "xds:fabric_link_bytes",
}
REQUESTS = [("metrics-1", "Hello, metrics", 5), ("metrics-2", "count my tokens please", 7)]


@pytest.fixture(scope="module")
def pod():
    with TestPod.running("met", {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0},
                                 "decode": {"groups": 1}}) as p:
        yield p


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """family name -> {(sample name, sorted labels): value}, parsed by prometheus_client."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str, **labels: str) -> float:
    return fams[family].get((sample, tuple(sorted(labels.items()))), 0.0)


def router_totals(pod: TestPod) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, url in pod.ready_info()["metrics"].items():
        if name.startswith("router-"):
            f = scrape(url)
            for key, fam, sample, labels in (
                    ("ttft", "xds:time_to_first_token_seconds", "xds:time_to_first_token_seconds_count", {}),
                    ("e2e", "xds:e2e_request_latency_seconds", "xds:e2e_request_latency_seconds_count", {}),
                    ("prompt", "xds:prompt_tokens", "xds:prompt_tokens_total", {}),
                    ("gen", "xds:generation_tokens", "xds:generation_tokens_total", {}),
                    ("length", "xds:request_success", "xds:request_success_total", {"finished_reason": "length"})):
                out[key] = out.get(key, 0.0) + value(f, fam, sample, **labels)
    return out


async def run_requests(pod: TestPod) -> int:
    """The module's requests, checked against the reference; returns generated tokens."""
    reference = ReferenceEngine.from_dir(pod.model_dir)
    async with InferenceClient(pod.routers, timeout_s=120) as client:
        for rid, prompt, n in REQUESTS:
            res = await client.complete(prompt, max_tokens=n, request_id=rid)
            want = reference.generate([GenerationRequest(rid, tuple(encode(prompt)),
                                                         SamplingParams(max_tokens=n))])[0].token_ids
            assert res.token_ids == want
    return sum(n for *_, n in REQUESTS)


async def test_every_service_serves_its_metrics_and_router_counts_exactly(pod):
    urls = pod.ready_info()["metrics"]
    assert set(urls) == {s.name for s in services(pod.spec)}
    assert all(u.startswith("http://127.0.0.1:") and u.endswith("/metrics") for u in urls.values())
    before = router_totals(pod)
    generated = await run_requests(pod)
    after = router_totals(pod)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta == {"ttft": len(REQUESTS), "e2e": len(REQUESTS), "length": len(REQUESTS),
                     "prompt": sum(len(encode(p)) for _, p, _ in REQUESTS), "gen": generated}

    for s in services(pod.spec):
        fams = scrape(urls[s.name])
        assert OWN_FAMILY[s.role] in fams, f"{s.name} lacks {OWN_FAMILY[s.role]}"
        assert all(name.startswith(("xds:", "process_")) for name in fams), sorted(fams)
        if s.role != "fabric":   # every service but the simulator watches peers' heartbeats
            states = fams.get("xds:peer_state", {})
            if s.role in ("router", "decode", "attention"):
                assert states and all(k[1] and v in (0.0, 1.0) for k, v in states.items()), s.name
    prefill = scrape(urls["prefill-0"])
    assert value(prefill, "xds:service_load", "xds:service_load", key="requests") >= len(REQUESTS)
    decode = scrape(urls["decode-0"])
    assert value(decode, "xds:decode_kv_capacity_blocks", "xds:decode_kv_capacity_blocks") == pod.spec.decode.kv_blocks
    experts = [scrape(urls[s.name]) for s in services(pod.spec) if s.role == "expert"]
    assert sum(sum(f["xds:expert_tokens"].values()) for f in experts) > 0
    att = scrape(urls["attention-0-0"])
    assert sum(v for (n, _), v in att["xds:attention_a2e_seconds"].items() if n.endswith("_count")) > 0


PROMETHEUS = shutil.which("prometheus")


async def test_real_prometheus_scrapes_every_service(pod, tmp_path: Path):
    if PROMETHEUS is None:
        # CI (.ci/run, XDS_REQUIRE_DOCKER=1) installs it: there a missing binary is a failure.
        (pytest.fail if os.environ.get("XDS_REQUIRE_DOCKER") == "1" else pytest.skip)(
            "needs Debian's prometheus binary (apt-get install prometheus)")
    urls = pod.ready_info()["metrics"]
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape_config(urls, interval_s=0.5))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: proc.poll() is None and _ready(api) or proc.poll() is not None, "prometheus ready")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        await run_requests(pod)

        def targets() -> list[dict]:
            return _get(api, "/api/v1/targets")["data"]["activeTargets"]

        def ttft() -> list:
            q = "sum(xds:time_to_first_token_seconds_count)"
            return _get(api, "/api/v1/query?" + urllib.parse.urlencode({"query": q}))["data"]["result"]

        up = _until(lambda: (t := targets()) and len(t) == len(urls) and all(x["health"] == "up" for x in t) and t,
                    "every target up")
        assert {x["labels"]["service"] for x in up} == set(urls)
        result = _until(lambda: (r := ttft()) and float(r[0]["value"][1]) >= 2 and r, "TTFT count in Prometheus")
        assert float(result[0]["value"][1]) >= len(REQUESTS)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body


def _until(check, what: str, timeout_s: float = 30.0):
    """Poll Prometheus's HTTP API (its scrapes are on its own clock) until ``check`` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s (last: {got!r})")
        time.sleep(0.2)


async def _http(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    writer.write_eof()   # a request cut short ends here, not at the server's read timeout
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


async def test_metrics_server_answers_bad_requests_and_a_failing_collector_with_a_status():
    from services.common import metrics as m
    server = m.MetricsServer("127.0.0.1:0")
    await server.start()
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    try:
        status, body = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and b"process_cpu_seconds_total" in body
        assert (await _http(port, b"GET /other HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
        assert (await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 405 Method Not Allowed"
        assert await _http(port, b"garbage without an end") == ("", b"")   # closed, nothing answered
        m.sampled("xds:unit_broken", "a collector that fails", lambda: 1 / 0)
        try:
            status, body = await _http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert status == "HTTP/1.1 500 Internal Server Error" and b"ZeroDivisionError" in body
        finally:
            del m._SAMPLED.families["xds:unit_broken"]
        assert (await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 200 OK"   # still serving
    finally:
        await server.stop()
