"""`xds chaos run --compose PROJECT`: the pod is a Docker Compose project, faults act on containers.

What a fault means for a container, and how it is proven (``docker inspect`` read back):

- kill (crash): SIGKILL to the container's main process (``State.Pid``, named by its command
  line like any local service). Not ``docker kill``: Docker counts that as a manual stop and its
  restart policy would not restart the container. Proven: the old PID gone, then Docker's
  restart read back (``RestartCount`` + 1, a new ``State.Pid``, running, healthcheck healthy).
- hang: ``docker pause`` (the cgroup freezer), proven by ``State.Paused`` and, where the cgroup
  is visible here, the freezer reading FROZEN; ``docker unpause`` after the duration, proven by
  ``State.Running`` and not paused (THAWED).
- stop / restart: ``docker stop`` (SIGTERM, then the grace period), proven by ``State.Running``
  false; then ``docker start`` (the restart policy never restarts a stopped container), proven
  by a new ``State.Pid`` running.

The pod itself is read from Docker: its containers by the Compose labels (project, service),
its spec from a service container's ``XDS_POD`` environment (what the services run with), the
routers at their published ports, every other plane (heartbeats, health, the fabric's admin
API, a service's admin RPC) at the container's address on the project network, which the host
reaches on a Linux engine. The reference engine runs here with the spec's model preset + seed.

The pure half (``ContainerState``, ``crash_seen``, ``back``, ``host_address``) has unit tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.chaos import faults as F
from services.pod.spec import COMPOSE_PORTS, PodSpec, Plane, address, pod_from_mapping, services

POLL_S = 0.05
SERVICE_LABEL = "com.docker.compose.service"
PROJECT_LABEL = "com.docker.compose.project"


@dataclass(frozen=True, slots=True)
class ContainerState:
    """The parts of one ``docker inspect`` record the faults are judged by."""
    id: str
    service: str
    pid: int
    running: bool
    paused: bool
    restart_count: int
    exit_code: int
    health: str                       # "healthy", "starting", "unhealthy"; "" without a healthcheck
    ip: str                           # on the project's network
    published: dict[str, str] = field(default_factory=dict)   # "50051/tcp" -> "127.0.0.1:50052"
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_inspect(cls, d: dict[str, Any]) -> ContainerState:
        st = d.get("State") or {}
        labels = (d.get("Config") or {}).get("Labels") or {}
        nets = (d.get("NetworkSettings") or {}).get("Networks") or {}
        project = labels.get(PROJECT_LABEL, "")
        ip = next((n.get("IPAddress", "") for k, n in nets.items() if k.startswith(f"{project}_")), "") or \
            next((n.get("IPAddress", "") for n in nets.values() if n.get("IPAddress")), "")
        published = {}
        for port, binds in ((d.get("NetworkSettings") or {}).get("Ports") or {}).items():
            if binds:
                host = binds[0].get("HostIp") or "127.0.0.1"
                published[port] = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{binds[0]['HostPort']}"
        env = dict(e.split("=", 1) for e in (d.get("Config") or {}).get("Env") or [] if "=" in e)
        return cls(id=d.get("Id", ""), service=labels.get(SERVICE_LABEL, ""), pid=int(st.get("Pid") or 0),
                   running=bool(st.get("Running")), paused=bool(st.get("Paused")),
                   restart_count=int(d.get("RestartCount") or 0), exit_code=int(st.get("ExitCode") or 0),
                   health=((st.get("Health") or {}).get("Status") or ""), ip=ip, published=published, env=env)

    def describe(self) -> str:
        state = "paused" if self.paused else "running" if self.running else f"exited ({self.exit_code})"
        return (f"{state}, pid {self.pid}, RestartCount {self.restart_count}"
                + (f", {self.health}" if self.health else ""))


def crash_seen(before: ContainerState, now: ContainerState) -> bool:
    """Docker saw the main process die: not running any more, or already restarted."""
    return now.restart_count > before.restart_count or now.pid != before.pid or not now.running


def back(before: ContainerState, now: ContainerState, *, restarted: bool) -> bool:
    """Running a new incarnation (``restarted``: by Docker's policy) and healthy where it has a check."""
    new = (now.restart_count > before.restart_count) if restarted else now.pid != before.pid
    return new and now.running and not now.paused and now.pid > 0 and now.health in ("", "healthy")


def host_address(addr: str, ips: dict[str, str]) -> str:
    """A compose-addressed endpoint (``tcp://expert-0:5101``, ``fabric:5201``) with the service
    name replaced by its container's address on the project network."""
    scheme, sep, rest = addr.rpartition("//")
    host, _, port = rest.rpartition(":")
    if host not in ips:
        raise F.FaultNotInjected(f"{addr}: no container address known for {host!r}")
    return f"{scheme}{sep}{ips[host]}:{port}"


class DockerError(RuntimeError):
    """A docker command failed (its stderr says why)."""


def _docker_sync(*args: str, timeout_s: float = 30) -> str:
    try:
        r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DockerError(f"docker {' '.join(args)}: {exc}") from None
    if r.returncode:
        raise DockerError(f"docker {' '.join(args)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


async def docker(*args: str, timeout_s: float = 60) -> str:
    """The docker CLI, from a worker thread: ``subprocess`` starts it with vfork, so no fork
    handler runs in the child. (uvloop's own subprocess support forks, and gRPC's fork handlers
    then crash the child now and then: SIGSEGV before the exec.)"""
    return await asyncio.to_thread(_docker_sync, *args, timeout_s=timeout_s)


async def inspect(container: str) -> ContainerState:
    try:
        return ContainerState.from_inspect(json.loads(await docker("inspect", container))[0])
    except DockerError as exc:
        raise F.FaultNotInjected(f"cannot read the container back: {exc}") from None


def _freezer(pid: int) -> str:
    """The cgroup freezer's reading for ``pid`` ("FROZEN"/"THAWED"; cgroup v2 "frozen 1"/"frozen 0"),
    or "" where the cgroup is not visible from here (a remote engine)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        for line in lines:
            _, ctrls, path = line.split(":", 2)
            if "freezer" in ctrls.split(","):
                return Path(f"/sys/fs/cgroup/freezer{path}/freezer.state").read_text().strip()
        for line in lines:
            if line.startswith("0::"):
                events = Path(f"/sys/fs/cgroup{line[3:]}/cgroup.events").read_text().split("\n")
                return next((e for e in events if e.startswith("frozen")), "")
    except (OSError, ValueError):
        pass
    return ""


class Containers:
    """``ProcessFaults`` on a Compose project's containers (see the module's docstring)."""
    kind = "container"

    def __init__(self, ids: dict[str, str], restart_within_s: float, stop_grace_s: float = 10.0) -> None:
        self.ids = ids                      # service -> container id (stable across restarts)
        self.restart_within_s = restart_within_s
        self.stop_grace_s = stop_grace_s
        self._paused: set[str] = set()

    def _id(self, name: str) -> str:
        if name not in self.ids:
            raise F.FaultNotInjected(f"{name}: no container of this project runs it")
        return self.ids[name]

    async def _until(self, name: str, cond, timeout_s: float, what: str) -> tuple[ContainerState, float]:
        t0 = time.monotonic()
        while True:
            st = await inspect(self._id(name))
            if cond(st):
                return st, time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise F.FaultNotInjected(f"{name}: {what} not seen within {timeout_s:g}s (docker inspect: {st.describe()})")
            await asyncio.sleep(POLL_S)

    async def kill(self, name: str) -> list[str]:
        before = await inspect(self._id(name))
        if not before.running or before.paused or before.pid <= 0:
            raise F.FaultNotInjected(f"{name}: container not running before the crash ({before.describe()})")
        if not Path(f"/proc/{before.pid}").exists():
            raise F.FaultNotSupported(f"{name}: the container's main process (pid {before.pid}) is not visible "
                                      "here; a crash needs the chaos tool on the Docker engine's host")
        out = [await F.kill(name, before.pid) + " (the container's main process)"]
        _, took = await self._until(name, lambda s: crash_seen(before, s), 10.0, "the crash")
        now, took = await self._until(name, lambda s: back(before, s, restarted=True), self.restart_within_s,
                                      "Docker's restart (restart policy) and a healthy healthcheck")
        out.append(f"docker inspect: restarted by Docker's restart policy, RestartCount "
                   f"{before.restart_count} -> {now.restart_count}, pid {before.pid} -> {now.pid}, "
                   f"running{', ' + now.health if now.health else ''} {took:.2f} s later")
        return out

    async def hang(self, name: str) -> str:
        cid = self._id(name)
        before = await inspect(cid)
        if not before.running or before.paused:
            raise F.FaultNotInjected(f"{name}: container not running before the pause ({before.describe()})")
        try:
            await docker("pause", cid)
        except DockerError as exc:
            raise F.FaultNotInjected(f"{name}: {exc}") from None
        self._paused.add(name)
        now, took = await self._until(name, lambda s: s.paused, 5.0, "State.Paused")
        frozen = _freezer(now.pid)
        if frozen and frozen not in ("FROZEN", "frozen 1"):
            raise F.FaultNotInjected(f"{name}: docker reports paused but the cgroup freezer reads {frozen!r}")
        return (f"docker pause: inspect State.Paused=true after {took * 1000:.0f} ms"
                + (f", cgroup freezer {frozen} (pid {now.pid})" if frozen else ""))

    async def resume(self, name: str) -> str:
        cid = self._id(name)
        held = await inspect(cid)
        if not held.paused:
            raise F.FaultNotInjected(f"{name}: container did not stay paused ({held.describe()} before unpause)")
        try:
            await docker("unpause", cid)
        except DockerError as exc:
            raise F.FaultNotInjected(f"{name}: {exc}") from None
        self._paused.discard(name)
        now, took = await self._until(name, lambda s: s.running and not s.paused, 5.0, "running after unpause")
        frozen = _freezer(now.pid)
        return (f"held paused until docker unpause; inspect Running=true Paused=false after {took * 1000:.0f} ms"
                + (f", cgroup freezer {frozen}" if frozen else ""))

    async def stop(self, name: str, restart: bool) -> list[str]:
        cid = self._id(name)
        before = await inspect(cid)
        try:
            await docker("stop", "-t", f"{self.stop_grace_s:g}", cid, timeout_s=self.stop_grace_s + 30)
        except DockerError as exc:
            raise F.FaultNotInjected(f"{name}: {exc}") from None
        stopped, _ = await self._until(name, lambda s: not s.running, 5.0, "the stop")
        out = [f"docker stop: inspect Running=false, exit code {stopped.exit_code} (pid {before.pid} ended)"]
        try:
            await docker("start", cid)
        except DockerError as exc:
            raise F.FaultNotInjected(f"{name}: {exc}") from None
        now, took = await self._until(name, lambda s: back(before, s, restarted=False), self.restart_within_s,
                                      "running again after docker start")
        out.append(f"docker start: running as pid {now.pid}{', ' + now.health if now.health else ''} "
                   f"{took:.2f} s later")
        return out

    async def cleanup(self) -> None:
        for name in list(self._paused):
            try:
                await docker("unpause", self._id(name))
            except (DockerError, F.FaultNotInjected):
                pass   # not paused any more
        self._paused.clear()


class ComposeNotReady(RuntimeError):
    """No such project, or a service of its spec has no running container."""


@dataclass
class ComposePod:
    """What the tool knows of a Compose pod: the same face as ``runner.PodHandle``."""
    project: str
    spec: PodSpec
    routers: list[str]
    fabric_admin: str
    ids: dict[str, str]
    ips: dict[str, str]

    @classmethod
    def open(cls, project: str) -> ComposePod:
        try:
            ids = _docker_sync("ps", "-a", "-q", "--no-trunc", "--filter", f"label={PROJECT_LABEL}={project}").split()
            states = [ContainerState.from_inspect(d) for d in json.loads(_docker_sync("inspect", *ids))] if ids else []
        except (DockerError, ValueError) as exc:
            raise ComposeNotReady(f"cannot read Compose project {project!r} from Docker: {exc}") from None
        by_service = {s.service: s for s in states}
        raw = next((s.env["XDS_POD"] for s in states if "XDS_POD" in s.env), None)
        if raw is None:
            raise ComposeNotReady(f"no container of Compose project {project!r} runs an xdeepserve service "
                                  f"(containers: {sorted(by_service) or 'none'}; is `docker compose -p {project} up` running?)")
        spec = pod_from_mapping(json.loads(raw))
        names = [s.name for s in services(spec)]
        down = [n for n in names if n not in by_service or not by_service[n].running or by_service[n].paused]
        if down:
            raise ComposeNotReady(f"Compose project {project!r}: not running: {', '.join(down)}")
        ips = {n: by_service[n].ip for n in names}
        grpc_port = f"{COMPOSE_PORTS['grpc']}/tcp"
        routers = [by_service[n].published.get(grpc_port) or host_address(address(spec, n, "grpc"), ips)
                   for n in names if n.startswith("router-")]
        # The simulator's admin API is its gRPC server, where its health service is too (host:port).
        return cls(project, spec, routers, host_address(address(spec, "fabric", "health"), ips),
                   {n: by_service[n].id for n in names}, ips)

    @property
    def model_dir(self) -> str:
        from services.model.cache import ensure_model
        return str(ensure_model(None, self.spec.model.preset, self.spec.model.seed, self.spec.cache_dir))

    def address(self, name: str, plane: Plane) -> str:
        return host_address(address(self.spec, name, plane), self.ips)

    def process_faults(self) -> Containers:
        sup = self.spec.supervision
        return Containers(self.ids, restart_within_s=max(60.0, sup.ready_timeout_s))

    def where(self) -> str:
        return f"Compose project {self.project} (docker host {os.environ.get('DOCKER_HOST', 'default')})"
