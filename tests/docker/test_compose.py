"""`docker compose up` of the whole pod, for real: images built here, SDK from the host.

Starts a Docker engine if none is running (tests/docker_engine.py, as ../shared/DOCKER.md
describes), builds the base images (docker/base/build.sh: no registry needed) and the project
image, brings the committed compose.yaml up under a private project name and free router
ports, waits for every container's healthcheck (docker's own health_status events), checks the
SDK's tokens against the reference engine, checks that the profile ``observability``'s
Prometheus scrapes every service (all targets ``up``, a PromQL query on the TTFT histogram
counts the SDK's requests), runs short versions of the chaos examples kill (an expert container
crashed) and hang (an expert container paused) through `xds chaos run --compose PROJECT`, kills
a router container and checks a new request still succeeds
through the other, then ``down -v`` and stops the engine it started. Nothing may
be left: no container, network or volume of the project, no daemon.

Skipped (with the reason) only where no engine can be had; ``XDS_REQUIRE_DOCKER=1`` (CI) turns
that skip into a failure. Phase timings are printed at the end of the module.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.client.sync import SyncInferenceClient
from services.chaos.faults import gone
from services.model.cache import ensure_model
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import encode
from services.pod.spec import load_pod, services
from tests.docker_engine import DockerEngine, EngineUnavailable

pytestmark = [pytest.mark.docker, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
HEALTH_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComposePod:
    engine: DockerEngine
    project: str
    compose: list[str]
    env: dict[str, str]
    routers: list[str]
    prometheus: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *args: str, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return self.engine.run(*self.compose, *args, timeout_s=timeout_s, check=check, cwd=str(ROOT),
                               extra_env=self.env)

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def leftovers(self) -> dict[str, str]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: self.engine.run("docker", *cmd, "--filter", label, "-q").stdout.strip()
                for kind, cmd in (("containers", ("ps", "-a")), ("volumes", ("volume", "ls")),
                                  ("networks", ("network", "ls")))}


def compose_command(engine: DockerEngine) -> list[str]:
    """`docker compose` (v2) when the client has it, else Debian's `docker-compose` 1.29.2."""
    if engine.run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose", path=engine.env["PATH"]):
        return ["docker-compose"]
    raise EngineUnavailable("neither `docker compose` nor `docker-compose` is installed")


def wait_healthy(pod: ComposePod, names: set[str], events: subprocess.Popen, timeout_s: float) -> None:
    """Read docker's health_status events (started before `up`) until every name is healthy."""
    assert events.stdout is not None
    healthy: set[str] = set()
    deadline = time.monotonic() + timeout_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(events.stdout, selectors.EVENT_READ)
        while not names <= healthy:
            left = deadline - time.monotonic()
            if left <= 0:
                ps = pod.run("ps", check=False).stdout
                raise AssertionError(f"not healthy after {timeout_s:g}s: {sorted(names - healthy)}\n{ps}")
            if not sel.select(left):
                continue
            chunk = os.read(events.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError("docker events ended")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ev = json.loads(line)
                if ev.get("Action") == "health_status: healthy":
                    healthy.add(ev["Actor"]["Attributes"].get("com.docker.compose.service", ""))


@pytest.fixture(scope="module")
def pod(request) -> Iterator[ComposePod]:
    timings: dict[str, float] = {}
    t0 = t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        timings[name] = round(now - t, 1)
        t = now

    engine = DockerEngine()
    try:
        engine.start()
        compose = compose_command(engine)
    except EngineUnavailable as exc:
        engine.stop()
        if os.environ.get("XDS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"XDS_REQUIRE_DOCKER=1 but no Docker engine: {exc}")
        pytest.skip(f"no Docker engine can be had here: {exc}")
    lap("engine_start_s")
    project = f"xdstest{uuid.uuid4().hex[:6]}"
    ports = [free_port(), free_port(), free_port(), free_port()]
    env = {"COMPOSE_PROJECT_NAME": project, "XDS_ROUTER_0_PORT": str(ports[0]), "XDS_ROUTER_1_PORT": str(ports[1]),
           "XDS_PROMETHEUS_PORT": str(ports[2]), "XDS_ROUTER_0_HTTP_PORT": str(ports[3])}
    p = ComposePod(engine, project, [*compose, "--profile", "observability"], env,
                   [f"127.0.0.1:{x}" for x in ports[:2]], f"http://127.0.0.1:{ports[2]}", timings)
    events = None
    try:
        engine.run("bash", str(ROOT / "docker/base/build.sh"), timeout_s=600)
        lap("base_images_s")
        p.run("build", "pod", timeout_s=900)   # the one image every service runs
        lap("project_image_s")
        p.run("build", "prometheus", timeout_s=600)   # Debian's prometheus package (profile observability)
        lap("prometheus_image_s")
        since = str(int(time.time()) - 1)   # replayed from here: no health event can be missed
        events = subprocess.Popen(
            ["docker", "events", "--since", since, "--format", "{{json .}}", "--filter", "type=container",
             "--filter", f"label=com.docker.compose.project={project}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=engine.env)
        p.run("up", "-d", timeout_s=HEALTH_TIMEOUT_S)
        wait_healthy(p, {s.name for s in services(load_pod(None))}, events, HEALTH_TIMEOUT_S)
        lap("up_until_all_healthy_s")
        yield p
    finally:
        if events is not None:
            events.terminate()
            events.wait(timeout=10)
            assert events.stdout is not None
            events.stdout.close()
        t = time.monotonic()
        logs = p.run("logs", "--no-color", "--tail", "30", check=False).stdout if request.session.testsfailed else ""
        down = p.run("down", "-v", "--remove-orphans", "-t", "10", check=False)
        lap("down_s")
        left = p.leftovers()
        pid = engine.proc.pid if engine.proc else None
        engine.stop()
        lap("engine_stop_s")
        timings["total_s"] = round(time.monotonic() - t0, 1)
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():   # into the CI log, even under -q
            print(f"\ncompose pod timings: {json.dumps(timings)}")
            if logs:
                print(logs[-6000:])
        assert down.returncode == 0, down.stderr
        assert not any(left.values()), f"left behind: {left}"
        if pid is not None:
            assert not Path(f"/proc/{pid}").exists(), "dockerd still running"


@pytest.fixture(scope="module")
def reference() -> ReferenceEngine:
    spec = load_pod(None)
    return ReferenceEngine.from_dir(ensure_model(None, spec.model.preset, spec.model.seed))


def expected(reference: ReferenceEngine, rid: str, prompt: str, kw: dict) -> tuple[int, ...]:
    return reference.generate([GenerationRequest(rid, tuple(encode(prompt)), SamplingParams(**kw))])[0].token_ids


CASES = [("Hello, SuperPod", {"max_tokens": 12}),
         ("The KV cache moves over the unified bus", {"max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
         ("a", {"max_tokens": 16})]


def test_sdk_against_the_compose_pod_equals_the_reference(pod: ComposePod, reference: ReferenceEngine) -> None:
    t = time.monotonic()
    with SyncInferenceClient(pod.routers, timeout_s=60) as client:
        for i, (prompt, kw) in enumerate(CASES):
            rid = f"compose-{i}"
            res = client.complete(prompt, request_id=rid, **kw)
            assert res.token_ids == expected(reference, rid, prompt, kw), f"{prompt!r} differs from the reference"
    pod.timings["requests_s"] = round(time.monotonic() - t, 1)


def _prometheus(pod: ComposePod, path: str) -> dict:
    with urllib.request.urlopen(pod.prometheus + path, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def _until(check, what: str, timeout_s: float = 60.0):
    """Poll Prometheus's HTTP API (it scrapes on its own 2 s clock) until ``check`` holds."""
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        time.sleep(0.5)
    return got


def test_the_official_openai_client_streams_the_reference_tokens_from_compose(pod: ComposePod,
                                                                            reference: ReferenceEngine) -> None:
    """router-0's OpenAI-compatible HTTP, published on 127.0.0.1 beside its gRPC port."""
    import openai

    port = int(pod.env["XDS_ROUTER_0_HTTP_PORT"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    prompt = "Hello from an OpenAI client"
    kw = dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    chunks = list(client.completions.create(model=model, prompt=list(encode(prompt)), stream=True,
                                            extra_body={"return_token_ids": True}, **kw))
    got = tuple(t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"])
    assert got == expected(reference, "openai-compose", prompt, kw)


def test_prometheus_of_the_observability_profile_scrapes_every_service(pod: ComposePod) -> None:
    t = time.monotonic()
    with SyncInferenceClient(pod.routers, timeout_s=60) as client:
        client.complete("scrape me", request_id="compose-prom", max_tokens=4)
    names = {s.name for s in services(load_pod(None))}

    def all_up():
        try:
            targets = _prometheus(pod, "/api/v1/targets")["activeTargets"]
        except OSError:
            return None   # Prometheus still starting
        got = {x["labels"]["service"]: x["health"] for x in targets}
        return got if got == dict.fromkeys(names, "up") else None

    _until(all_up, "every service's /metrics target up in Prometheus")
    query = urllib.parse.urlencode({"query": "sum(xds:time_to_first_token_seconds_count)"})
    result = _until(lambda: [r for r in _prometheus(pod, "/api/v1/query?" + query)["result"]
                             if float(r["value"][1]) >= 1], "TTFT histogram count in Prometheus")
    assert float(result[0]["value"][1]) >= 1
    pod.timings["prometheus_s"] = round(time.monotonic() - t, 1)


def test_a_crashed_expert_container_is_restarted_and_the_stream_stays_exact(pod: ComposePod,
                                                                            reference: ReferenceEngine) -> None:
    """Crash (not stop) an expert container mid-stream: its main process is SIGKILLed, Docker
    sees the crash and restarts it (restart: unless-stopped); the attention ranks fail over to
    the replica meanwhile, so the stream completes exact, and the restarted expert is healthy."""
    t = time.monotonic()
    victim = pod.container("expert-1")
    assert victim, "expert-1 has no container"
    before = json.loads(pod.engine.run("docker", "inspect", victim).stdout)[0]
    main_pid, restarts = before["State"]["Pid"], before["RestartCount"]
    assert before["State"]["Running"] and main_pid > 0
    events = subprocess.Popen(
        ["docker", "events", "--since", str(int(time.time()) - 1), "--format", "{{json .}}",
         "--filter", "type=container", "--filter", f"container={victim}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=pod.engine.env)
    prompt = "an expert crashes under this stream " * 2
    kw = {"max_tokens": 64, "temperature": 0.8, "top_p": 0.9, "seed": 11}
    tokens: list[int] = []
    try:
        with SyncInferenceClient(pod.routers, timeout_s=120) as client:
            for d in client.generate(prompt, request_id="compose-crash", **kw):
                assert d.index == len(tokens)
                tokens += d.token_ids
                if len(tokens) >= 8 and main_pid:
                    os.kill(main_pid, signal.SIGKILL)            # the container's main process: a crash
                    assert _gone(main_pid), "the expert's main process survived SIGKILL"
                    main_pid = 0
        assert tuple(tokens) == expected(reference, "compose-crash", prompt, kw)
        wait_healthy(pod, {"expert-1"}, events, HEALTH_TIMEOUT_S)  # Docker restarted it: healthy again
    finally:
        events.terminate()
        events.wait(timeout=10)
        assert events.stdout is not None
        events.stdout.close()
    after = json.loads(pod.engine.run("docker", "inspect", victim).stdout)[0]
    assert after["RestartCount"] == restarts + 1 and after["State"]["Running"]
    assert after["State"]["Pid"] != before["State"]["Pid"]
    with SyncInferenceClient(pod.routers, timeout_s=60) as client:
        fresh = client.complete(prompt, request_id="compose-crash-fresh", **kw)
    assert fresh.token_ids == expected(reference, "compose-crash-fresh", prompt, kw)
    pod.timings["expert_crash_and_restart_s"] = round(time.monotonic() - t, 1)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """The PID disappears (a zombie reaped by containerd's shim counts as gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.01)   # no event for another namespace's reaper; a bounded poll
    return False


def _short_example(name: str, tmp: Path, **load) -> Path:
    """An example scenario of examples/chaos/ with a shorter load, written to ``tmp``."""
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "chaos" / f"{name}.yaml").read_text())
    data["load"] = {**data["load"], **load}
    if name == "kill-each-role":   # its expert kill alone, first
        data["faults"] = [{**{k: v for k, v in f.items() if k not in ("after_previous", "delay_s")}, "at_s": 1.0}
                          for f in data["faults"] if f["target"] == {"role": "expert"}]
    out = tmp / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def _chaos_run(pod: ComposePod, scenario: Path, report_dir: Path) -> dict:
    """The real `xds chaos run --compose PROJECT` (a subprocess, the user's command line)."""
    r = subprocess.run([sys.executable, "-m", "services.cli", "chaos", "run", str(scenario), "--compose", pod.project,
                        "--json", "--report", str(report_dir)], capture_output=True, text=True, timeout=150,
                       cwd=str(ROOT), env=pod.engine.env)
    assert r.stdout.lstrip().startswith("{"), f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    report = json.loads(r.stdout)
    print(json.dumps({"scenario": report["scenario"], "faults": [[f["label"], f["evidence"], f["recovery"]]
                                                                 for f in report["faults"]]}))
    assert report["verdict"] == "PASS" and r.returncode == 0, \
        json.dumps({k: report[k] for k in ("failed_checks", "faults", "errors")}, indent=1)
    assert report["exactness"]["mismatched"] == [] and report["exactness"]["checked"] == report["load"]["requests"]
    assert all(f["verified"] and f["recovery"]["recovery_s"] is not None for f in report["faults"])
    assert (report_dir / "timeline.png").stat().st_size > 0
    return report


def _inspect(pod: ComposePod, service: str) -> dict:
    return json.loads(pod.engine.run("docker", "inspect", pod.container(service)).stdout)[0]


def test_xds_chaos_run_compose_crash_and_pause_of_an_expert_container_pass(pod: ComposePod, tmp_path: Path) -> None:
    """Short versions of the kill and hang examples through `xds chaos run --compose`: the crash
    is Docker-restarted (RestartCount read back), the hang is a `docker pause` (State.Paused and
    the cgroup freezer read back), and every stream equals the reference engine's tokens.
    Runs before the router-kill test below: `--compose` refuses a pod with a service down."""
    t = time.monotonic()
    restarts = {s: _inspect(pod, s)["RestartCount"] for s in ("expert-0", "expert-1", "expert-2", "expert-3")}
    kill = _chaos_run(pod, _short_example("kill-each-role", tmp_path, rate_rps=3, duration_s=3,
                                          max_tokens=[16, 32]), tmp_path / "kill")
    (f,) = kill["faults"]
    victim = f["services"][0]
    assert f["kind"] == "kill" and victim.startswith("expert-")
    assert "SIGKILL pid" in f["evidence"][0] and "gone from /proc" in f["evidence"][0]
    assert "restarted by Docker's restart policy" in f["evidence"][1]
    after = _inspect(pod, victim)   # what the report claims, read back independently
    assert after["RestartCount"] == restarts[victim] + 1 and after["State"]["Running"]
    hang = _chaos_run(pod, _short_example("hang-expert", tmp_path, streams=6, max_tokens=[40, 56]),
                      tmp_path / "hang")
    (f,) = hang["faults"]
    assert f["kind"] == "hang" and f["services"][0].startswith("expert-")
    assert "docker pause: inspect State.Paused=true" in f["evidence"][0] and ("FROZEN" in f["evidence"][0] or "frozen 1" in f["evidence"][0])
    assert "Paused=false" in f["evidence"][1] and f["t_revert"] > f["t_inject"]
    assert not _inspect(pod, f["services"][0])["State"]["Paused"]
    pod.timings["chaos_compose_s"] = round(time.monotonic() - t, 1)


def test_a_killed_router_container_does_not_stop_the_pod(pod: ComposePod, reference: ReferenceEngine) -> None:
    t = time.monotonic()
    victim = pod.container("router-0")
    assert victim, "router-0 has no container"
    pod.engine.run("docker", "kill", victim)
    state = json.loads(pod.engine.run("docker", "inspect", victim).stdout)[0]["State"]
    assert not state["Running"]
    with SyncInferenceClient(pod.routers, timeout_s=60) as client:   # both endpoints, router-0 first
        prompt, kw = "after a router died", {"max_tokens": 10}
        res = client.complete(prompt, request_id="compose-after-kill", **kw)
    assert res.token_ids == expected(reference, "compose-after-kill", prompt, kw)
    pod.timings["kill_and_request_s"] = round(time.monotonic() - t, 1)
