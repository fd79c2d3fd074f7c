"""Runs one chaos experiment against a running pod: load, faults, liveness, then the verdict.

Owned tasks in one ``asyncio.TaskGroup``: the liveness watch (the pod's heartbeats through the
same failure detector the routers run, plus the fabric's health check), one task per request
and one per fault. Times are seconds since the load started. Whatever happens, a stopped
process is continued and fabric faults are healed before ``run`` returns: an experiment never
leaves the pod broken.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.chaos import faults as F
from services.chaos.backends import LocalProcesses, ProcessFaults
from services.chaos.plan import Plan, PlannedFault, plan
from services.chaos.scenario import FABRIC_KINDS, Scenario
from services.chaos.timeline import FaultRecord, LivenessEvent, StreamRecord, recovery
from services.client.errors import XdsClientError
from services.client.sdk import InferenceClient
from services.common.health import HealthProbeError, probe
from services.common.heartbeat import HeartbeatSubscriber
from services.common.liveness import Change, DetectorConfig, FailureDetector, Liveness
from services.pod.spec import Plane, PodSpec, address, load_pod, services

WATCH_S = 0.05


class PodNotReady(RuntimeError):
    """The pod is not there, or not every service is alive before the experiment starts."""


@dataclass
class PodHandle:
    """What the tool knows of a pod started by ``xds up``: its ready file, and through the run
    directory in it, the resolved spec and every service's own ready file (current PIDs)."""
    ready_file: Path
    spec: PodSpec
    routers: list[str]
    fabric_admin: str

    @classmethod
    def open(cls, ready_file: str | Path) -> PodHandle:
        p = Path(ready_file)
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise PodNotReady(f"cannot read the pod's ready file {p}: {exc} (is `xds up --ready-file {p}` running?)") from None
        spec = load_pod(Path(info["run_dir"]) / "pod.yaml")
        return cls(p, spec, list(info["routers"]), info["fabric_admin"])

    @property
    def model_dir(self) -> str:
        assert self.spec.model.dir, "a resolved pod spec names its model directory"
        return self.spec.model.dir

    def pid(self, name: str) -> int:
        """The service's current PID: its own ready file (rewritten by every incarnation), else
        the pod's ready file (``xds up`` rewrites it after restarts)."""
        try:
            return int(json.loads((self.spec.run_path / f"{name}.ready").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pids = json.loads(self.ready_file.read_text()).get("pids", {})
            if name not in pids:
                raise F.FaultNotInjected(f"{name}: no PID known (neither its ready file nor the pod's)") from None
            return int(pids[name])

    def address(self, name: str, plane: Plane) -> str:
        """Where this tool reaches ``name``'s ``plane`` (the pod's own addressing rule)."""
        return address(self.spec, name, plane)

    def process_faults(self) -> ProcessFaults:
        sup = self.spec.supervision
        return LocalProcesses(self.pid, sup.ready_timeout_s + sup.backoff_max_s, WATCH_S)


class Watch:
    """The routers' view of liveness: heartbeats through a FailureDetector with the pod's own
    settings, and the fabric simulator's health check (it has no heartbeat)."""

    def __init__(self, pod: Pod, clock: Callable[[], float]) -> None:
        hb = pod.spec.heartbeat
        self.pod, self.clock = pod, clock
        self.names = [s.name for s in services(pod.spec)]
        self.events: list[LivenessEvent] = []
        self.detector = FailureDetector(DetectorConfig(hb.suspect_after_s, hb.dead_after_s))
        self.sub = HeartbeatSubscriber([pod.address(n, "heartbeat") for n in self.names if n != "fabric"],
                                       detector=self.detector, on_change=self._on_change, on_beat=self._on_beat,
                                       tick_s=WATCH_S)
        self.fabric_state = ""
        self._epochs: dict[str, str] = {}   # the epoch of each service's latest event

    def _on_change(self, c: Change) -> None:
        self._epochs[c.peer] = c.epoch
        self.events.append(LivenessEvent(self.clock(), c.peer, c.new.value, c.epoch))

    def _on_beat(self, beat: Any) -> None:
        # A restart faster than the suspect window never changes the state (alive -> alive),
        # so the detector reports no change: the new epoch alone says the service is back.
        last = self._epochs.get(beat.service)
        if last is not None and beat.epoch != last and self.detector.state(beat.service) is Liveness.ALIVE:
            self._epochs[beat.service] = beat.epoch
            self.events.append(LivenessEvent(self.clock(), beat.service, "alive", beat.epoch))

    def epoch(self, name: str) -> str:
        view = self.detector.peers.get(name)
        return view.epoch if view else ""

    def state(self, name: str) -> str:
        if name == "fabric":
            return self.fabric_state
        s = self.detector.state(name)
        return s.value if s else ""

    async def _fabric(self) -> None:
        target = self.pod.address("fabric", "health")
        while True:
            try:
                st = "alive" if await asyncio.to_thread(probe, target, "", 0.5) == "SERVING" else "dead"
            except HealthProbeError:
                st = "dead"
            if st != self.fabric_state:
                self.fabric_state = st
                self.events.append(LivenessEvent(self.clock(), "fabric", st))
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.sub.run())
            tg.create_task(self._fabric())


class Pod(Protocol):
    """What an experiment needs of a pod: ``PodHandle`` (``xds up``) or ``containers.ComposePod``."""
    spec: PodSpec
    routers: list[str]
    fabric_admin: str

    @property
    def model_dir(self) -> str: ...

    def address(self, name: str, plane: Plane) -> str: ...

    def process_faults(self) -> ProcessFaults: ...


class Experiment:
    def __init__(self, scenario: Scenario, pod: Pod, expected: list[list[int]] | None = None) -> None:
        self.scenario, self.pod = scenario, pod
        self.plan: Plan = plan(scenario, services(pod.spec), pod.spec.heartbeat.dead_after_s)
        self.t0 = time.monotonic()
        self.watch = Watch(pod, self.now)
        self.streams: list[StreamRecord] = []
        self.records = [FaultRecord(p.index, p.label, p.fault.kind, p.services) for p in self.plan.faults]
        self.done = [asyncio.Event() for _ in self.plan.faults]
        self.load_done = asyncio.Event()
        self.expected = expected
        self.t_end = 0.0
        self.run_id = uuid.uuid4().hex[:6]
        self.procs = pod.process_faults()          # kill/hang/stop: on processes or on containers
        self.fabric: F.Fabric | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- preflight -----------------------------------------------------------------------
    def preflight(self) -> None:
        """Refuse what cannot run, before anything is started."""
        if any(p.fault.kind == "straggler" for p in self.plan.faults):
            F.straggler_call()   # FaultNotSupported when the pod has no such admin call

    async def _wait_all_alive(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [n for n in self.watch.names if self.watch.state(n) != "alive"]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise PodNotReady(f"not alive in the routers' view after {timeout_s:g}s: {', '.join(missing)}")
            await asyncio.sleep(WATCH_S)

    # -- load ------------------------------------------------------------------------------
    async def _request(self, client: InferenceClient, i: int) -> None:
        req = self.plan.requests[i % len(self.plan.requests)]
        s = StreamRecord(i, f"chaos-{self.scenario.name}-{self.run_id}-{i}", self.now())
        self.streams.append(s)
        try:
            async for d in client.generate(req.prompt, request_id=s.request_id, **req.kwargs):
                if d.index != len(s.tokens):
                    s.error_code, s.error = "BAD_INDEX", f"delta index {d.index} after {len(s.tokens)} tokens"
                    break
                s.arrivals.append((self.now(), len(d.token_ids)))
                s.tokens += d.token_ids
                if d.finish_reason:
                    s.finish = d.finish_reason
        except asyncio.CancelledError:
            s.error_code, s.error = "TIMEOUT", f"not finished within the load's timeout_s {self.scenario.load.timeout_s:g}"
            raise
        except XdsClientError as exc:
            s.error_code, s.error = exc.status.name, exc.message
        except Exception as exc:  # noqa: BLE001 - the stream's error, counted and judged like any other
            s.error_code, s.error = f"CLIENT_{type(exc).__name__}", str(exc)
        finally:
            s.t_end = self.now()

    def _keep_issuing(self, i: int) -> bool:
        load = self.scenario.load
        if load.streams:
            return i < load.streams
        if i / load.rate_rps < load.duration_s:
            return True
        return load.until_faults_done and not all(d.is_set() for d in self.done)

    async def _load(self) -> None:
        load = self.scenario.load
        async with InferenceClient(self.pod.routers, timeout_s=load.timeout_s) as client:
            tasks: list[asyncio.Task] = []
            i = 0
            while self._keep_issuing(i):
                if load.rate_rps:
                    await asyncio.sleep(max(0.0, i / load.rate_rps - self.now()))
                tasks.append(asyncio.create_task(self._request(client, i)))
                i += 1
            done, pending = await asyncio.wait(tasks, timeout=load.timeout_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.t_end = self.now()
        self.load_done.set()

    def _reached(self, n: int) -> bool:
        live = [s for s in self.streams if s.t_end is None]
        return bool(self.streams) and all(len(s.tokens) >= n for s in live)

    # -- faults ----------------------------------------------------------------------------
    async def _trigger(self, p: PlannedFault) -> None:
        f = p.fault
        if f.at_s is not None:
            await asyncio.sleep(max(0.0, f.at_s - self.now()))
        elif f.after_tokens is not None:
            while not (self._reached(f.after_tokens) or self.load_done.is_set()):
                await asyncio.sleep(WATCH_S / 5)
        else:
            await self.done[p.index - 1].wait()
        await asyncio.sleep(f.delay_s)
        if self.load_done.is_set():
            raise F.FaultNotInjected("the load ended before this fault's trigger: nothing was tested")

    async def _hold(self, p: PlannedFault) -> None:
        if p.duration_s is not None:
            await asyncio.sleep(p.duration_s)
        else:
            await self.load_done.wait()

    async def _inject(self, p: PlannedFault, rec: FaultRecord) -> None:
        kind = p.fault.kind
        rec.old_epochs = {n: self.watch.epoch(n) for n in p.services}
        if kind in ("kill", "stop", "restart", "hang"):
            name = p.services[0]
            rec.t_inject = self.now()
            if kind == "kill":
                rec.evidence += await self.procs.kill(name)
            elif kind == "hang":
                rec.evidence.append(await self.procs.hang(name))
                await self._hold(p)
                rec.evidence.append(await self.procs.resume(name))
                rec.t_revert = self.now()
            else:
                rec.evidence += await self.procs.stop(name, restart=kind == "restart")
        elif kind in FABRIC_KINDS:
            assert self.fabric is not None
            f = p.fault
            lf = (F.LinkFault(npus_a=p.npus_a, npus_b=p.npus_b) if kind == "partition" or p.pair_cut else
                  F.LinkFault(links=p.links, up=kind != "link_down", added_latency_us=f.added_latency_us,
                              bandwidth_factor=f.bandwidth_factor or 1.0))
            rec.t_inject = self.now()
            rec.evidence.append(await self.fabric.inject(p.index, lf))
            await self._hold(p)
            rec.evidence.append("healed: " + await self.fabric.revert(p.index))
            rec.t_revert = self.now()
        else:   # straggler, through the experts' admin call (preflight made sure there is one)
            call, name, f = F.straggler_call(), p.services[0], p.fault
            rec.t_inject = self.now()
            rec.evidence.append(await call(self.pod, name, f.delay_ms, f.per))
            await self._hold(p)
            rec.evidence.append("cleared: " + await call(self.pod, name, 0.0, f.per))
            rec.t_revert = self.now()

    async def _fault(self, p: PlannedFault) -> None:
        rec = self.records[p.index]
        try:
            await self._trigger(p)
            await self._inject(p, rec)
            await self._recovered(rec)
        except (F.FaultNotInjected, F.FaultNotSupported) as exc:
            rec.error = str(exc)
        finally:
            self.done[p.index].set()

    async def _recovered(self, rec: FaultRecord) -> None:
        """Until the fault's recovery is known, cannot come any more (the load ended without the
        streams' progress), or ``settle_timeout_s`` after the injection."""
        deadline = time.monotonic() + self.scenario.settle_timeout_s
        while time.monotonic() < deadline:
            r = recovery(rec, self.streams, self.watch.events, stall_s=self.scenario.stall_s, now=self.now())
            if r.recovery_s is not None:
                return
            # Once the load is over no stream can progress any more; a service that is not back yet
            # still may be (a hung one ends its stale incarnation and is restarted): wait for it.
            if self.load_done.is_set() and (r.back_s is not None or not r.back_applies):
                return
            await asyncio.sleep(WATCH_S)

    # -- all of it ---------------------------------------------------------------------------
    async def run(self) -> None:
        self.preflight()
        self.fabric = F.Fabric(self.pod.fabric_admin) if any(p.fault.kind in FABRIC_KINDS for p in self.plan.faults) else None
        watch = asyncio.create_task(self.watch.run())
        try:
            await self._wait_all_alive(max(10.0, 5 * self.pod.spec.heartbeat.dead_after_s))
            self.t0 = time.monotonic()
            self.watch.events = [LivenessEvent(0.0, e.service, e.state, e.epoch) for e in self.watch.events]
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._load())
                for p in self.plan.faults:
                    tg.create_task(self._fault(p))
            self.t_end = max(self.t_end, self.now())
            if watch.done() and watch.exception() is not None:
                raise RuntimeError("the liveness watch failed") from watch.exception()
        finally:
            await self._cleanup()
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _cleanup(self) -> None:
        await self.procs.cleanup()
        if self.fabric is not None:
            for index in list(self.fabric.active):
                try:
                    await self.fabric.revert(index)
                except F.FaultNotInjected as exc:
                    self.records[index].error = self.records[index].error or f"heal failed: {exc}"
            await self.fabric.close()

    def reference(self) -> list[list[int]]:
        """The reference engine's tokens for every request (the exactness oracle)."""
        from services.model.engine import GenerationRequest, ReferenceEngine
        from services.model.sampling import SamplingParams
        from services.model.tokenizer import encode
        ref = ReferenceEngine.from_dir(self.pod.model_dir)
        reqs = [GenerationRequest(f"ref-{r.index}", tuple(encode(r.prompt)), SamplingParams(**r.kwargs))
                for r in self.plan.requests]
        return [list(r.token_ids) for r in ref.generate(reqs)]

    def result(self) -> dict[str, Any]:
        from services.chaos.report import build
        return build(self)
