"""Decode master process (``decode-g``): ``python -m services.run --pod FILE --name decode-g``.

A thin server around ``DecodeCore``: routers ``Admit``/``Cancel`` over ZeroMQ RPC (tokens are
pushed back to the admitting router's connection), attention ranks get ``Load``/``Run``/``Free``
over XCCL send and answer ``Loaded``/``Logits`` the same way.

Tasks (one TaskGroup, under ``ServiceRuntime.run_until_stopped``):
- one sender per attention rank drains that rank's bounded outbox (Load, Free), so a rank sees
  a sequence's Load before its Free;
- one receiver demultiplexes everything the ranks send (Loaded by request id, Logits by step);
- the step loop: plan a step, send each rank its ``Run``, wait for every ``Logits`` with a
  deadline, hand the results to the core. A rank that does not answer in time ends its
  sequences with finish_reason "error" (UNAVAILABLE) and is not used again.
- status: "degraded" in the heartbeat while any rank reports a routed expert it cannot reach
  over the fabric (``experts_cut_off`` in its beat: a partition), so routers stop choosing
  this group (its steps fail UNAVAILABLE and its requests replay elsewhere); "serving" again
  once every rank reaches every expert.
Every wait has a timeout; a peer's garbage is counted and logged, never fatal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from services.common import metrics
from services.common.rpc import Ok
from services.common.status import Code, Refused
from services.common.runtime import ServiceRuntime
from services.common.wire import WireError, decode, encode
from services.common.heartbeat import Beat, HeartbeatSubscriber
from services.common.liveness import Change, DetectorConfig, FailureDetector, Liveness
from services.decode.core import (
    CoreConfig, DecodeCore, Effect, Emit, Request, SendFree, SendLoad, SeqState, StepRefused)
from services.decode.messages import DecodeStats, DecodeStatsQuery
from services.model.cache import ensure_model
from services.model.config import ModelConfig
from services.model.sampling import InvalidSamplingParams
from services.pod.spec import PodSpec, address, service, services
from services.protocol.inference import Admit, Cancel, Subscribe
from services.protocol.step import Free, Load, Loaded, Logits, Run
from xccl_net.errors import EndpointClosed, ProtocolError, XcclError, XcclTimeout

RECV_POLL_S = 1.0


@dataclass(frozen=True, slots=True)
class MasterConfig:
    max_queue: int = 64
    # A rank silent this long is gone for this group; the floor keeps a slow host from
    # failing requests that a heartbeat would still call alive.
    min_rank_timeout_s: float = 2.0
    # A Load includes the rank's KV pool transfer, which has its own timeout (KVPoolClient: 5 s).
    load_extra_s: float = 5.0
    send_timeout_s: float = 5.0
    drain_idle_s: float = 3.0       # on SIGTERM: let running sequences finish this long, then evict

    def rank_timeout_s(self, spec: PodSpec) -> float:
        # A rank may legitimately wait out experts.failover_wait_s for a live replica (and
        # an answer timeout either side) before it answers the step with UNAVAILABLE naming
        # the expert: the master must not give up on the rank first.
        expert_wait = spec.experts.failover_wait_s + 2 * spec.experts.answer_timeout_s + 1.0
        return max(self.min_rank_timeout_s, 4 * spec.heartbeat.dead_after_s, expert_wait)


class Master:
    def __init__(self, spec: PodSpec, name: str, core: DecodeCore, cfg: MasterConfig) -> None:
        self.spec, self.name, self.core, self.cfg = spec, name, core, cfg
        self.rank_timeout_s = cfg.rank_timeout_s(spec)
        self.rt: ServiceRuntime | None = None
        self.routers: dict[str, bytes] = {}         # router service name -> its RPC identity
        bound = 4 * core.cfg.max_batch + 64         # Loads <= max_batch at once, Frees likewise
        self.outbox: dict[str, asyncio.Queue[Load | Free]] = {r: asyncio.Queue(bound) for r in core.cfg.ranks}
        # (request id, rank) -> timers of the Loads sent, oldest first (a rank answers in order;
        # a takeover can have a second Load of the same id out behind the first).
        self.load_timers: dict[tuple[str, str], list[asyncio.TimerHandle]] = {}
        self.step_waiters: dict[str, asyncio.Future[Logits | str]] = {}   # str: why no answer
        self.profile = dict.fromkeys(("prof_steps", "prof_schedule_ms", "prof_rank_rtt_ms",
                                      "prof_sample_stream_ms"), 0.0)
        self.step_no = 0
        self.cut_off: dict[str, int] = {}           # rank -> experts it cannot reach (its beats)
        self.work = asyncio.Event()
        self.idle = asyncio.Event()
        self.unroutable = 0
        self.rank_epochs: dict[str, str] = {}
        self.bad_from_ranks = 0

    # -- RPC from routers ------------------------------------------------------------------
    async def on_rpc(self, msg: Any, ident: bytes) -> Any:
        if isinstance(msg, Admit):
            return self._admit(msg, ident)
        if isinstance(msg, Cancel):
            self._apply(self.core.cancel(msg.request_id, msg.router))   # a core Refused goes back as rpc.Failed
            return Ok()
        if isinstance(msg, Subscribe):
            self.routers[msg.router] = ident
            return Ok()
        if isinstance(msg, DecodeStatsQuery):
            return self.stats()
        raise Refused(Code.INVALID_ARGUMENT, f"{self.name} does not handle {type(msg).__name__}")

    def _admit(self, msg: Admit, ident: bytes) -> Ok:
        assert self.rt is not None
        if self.rt.draining:
            raise Refused(Code.UNAVAILABLE, f"{self.name} is shutting down")
        if not msg.router:
            raise Refused(Code.INVALID_ARGUMENT, "Admit.router (the router's service name) is empty")
        try:
            params = msg.sampling.params()
        except InvalidSamplingParams as exc:
            raise Refused(Code.INVALID_ARGUMENT, f"{msg.request_id}: {exc}") from None
        self.routers[msg.router] = ident   # pushes follow the router's latest connection
        req = Request(msg.request_id, msg.prompt_len, params, msg.kv, msg.next_token, msg.generated, msg.router)
        self._apply(self.core.admit(req))
        self.rt.log.info("decode.admit", request_id=msg.request_id, prompt_len=msg.prompt_len,
                         state=str(self.core.state_of(msg.request_id)))
        return Ok()

    def stats(self) -> DecodeStats:
        c, s = self.core, self.core.stats
        load = c.load()
        return DecodeStats(int(load["running"]), c.queued, c.free_blocks, c.cfg.kv_blocks, c.cfg.max_batch,
                           s.steps, s.tokens, s.admitted, s.refused, s.finished, s.cancelled, s.failed,
                           s.queue_peak, int(load["live_ranks"]), self.unroutable)

    # -- effects ---------------------------------------------------------------------------
    def _apply(self, effects: list[Effect]) -> None:
        assert self.rt is not None and self.rt.rpc is not None
        for e in effects:
            if isinstance(e, Emit):
                ident = self.routers.get(e.router)
                if ident is None:
                    self.unroutable += 1
                    self.rt.log.warning("decode.unroutable", request_id=e.tokens.request_id, router=e.router)
                else:
                    self.rt.rpc.push(ident, e.tokens)
                if e.tokens.finish_reason:
                    self.rt.log.info("decode.finish", request_id=e.tokens.request_id,
                                     reason=e.tokens.finish_reason, error=e.tokens.error or None,
                                     code=str(e.tokens.code) if e.tokens.error else None)
            elif isinstance(e, SendLoad):
                self._enqueue(e.rank, e.load)
            elif isinstance(e, SendFree):
                self._enqueue(e.rank, e.free)
        self.work.set()
        self._update_idle()

    def _enqueue(self, rank: str, msg: Load | Free) -> None:
        try:
            self.outbox[rank].put_nowait(msg)
        except asyncio.QueueFull:
            # Cannot happen within the bound unless a rank's sender is wedged: fail the load loudly.
            assert self.rt is not None
            self.rt.log.error("decode.outbox_full", rank=rank, msg_type=type(msg).__name__)
            if isinstance(msg, Load):
                self._apply(self.core.load_failed(msg.request_id, f"outbox to {rank} is full"))

    def _update_idle(self) -> None:
        busy = self.core.queued or self.core.count(SeqState.LOADING) or self.core.has_running
        (self.idle.clear if busy else self.idle.set)()

    def _stamped(self, msg: Any) -> Any:
        """Load/Run/Free carry this master's incarnation: a rank drops what an earlier
        incarnation of its master left in its cache, and refuses that incarnation's late words."""
        assert self.rt is not None and self.rt.heartbeat is not None
        return dataclasses.replace(msg, master_epoch=self.rt.heartbeat.epoch)

    # -- XCCL: senders, receiver -----------------------------------------------------------
    async def sender(self, rank: str) -> None:
        assert self.rt is not None
        q, ep, loop = self.outbox[rank], self.rt.endpoint, asyncio.get_running_loop()
        while True:
            msg = await q.get()
            try:
                await ep.send(rank, encode(self._stamped(msg)), timeout_s=self.cfg.send_timeout_s)
            except asyncio.CancelledError:
                raise
            except XcclError as exc:
                self.rt.log.warning("decode.send_failed", rank=rank, msg_type=type(msg).__name__, error=str(exc))
                if isinstance(msg, Load):   # unreachable or not draining its ring: the rank is gone
                    self._apply(self.core.rank_failed(rank, f"could not send Load to attention rank {rank}: {exc}"))
                continue
            if isinstance(msg, Load):
                self.load_timers.setdefault((msg.request_id, rank), []).append(loop.call_later(
                    self.rank_timeout_s + self.cfg.load_extra_s, self._load_timeout, msg.request_id, rank))

    def _pop_load_timer(self, request_id: str, rank: str) -> asyncio.TimerHandle | None:
        timers = self.load_timers.get((request_id, rank))
        if not timers:
            return None
        timer = timers.pop(0)
        if not timers:
            del self.load_timers[(request_id, rank)]
        return timer

    def _load_timeout(self, request_id: str, rank: str) -> None:
        self._pop_load_timer(request_id, rank)
        if self.core.state_of(request_id) is SeqState.LOADING:
            limit = self.rank_timeout_s + self.cfg.load_extra_s
            self._apply(self.core.rank_failed(rank, f"attention rank {rank} did not answer Load of {request_id} "
                                                    f"within {limit:g} s"))

    async def receiver(self) -> None:
        assert self.rt is not None
        ep = self.rt.endpoint
        while True:
            try:
                src, frames = await ep.recv(timeout_s=RECV_POLL_S)
                msg = decode(frames)
            except XcclTimeout:
                continue
            except EndpointClosed:
                return
            except (ProtocolError, WireError) as exc:
                self.bad_from_ranks += 1
                self.rt.log.warning("decode.bad_from_rank", peer=getattr(exc, "peer", None), error=str(exc))
                continue
            if src not in self.outbox:
                self.bad_from_ranks += 1
                self.rt.log.warning("decode.unknown_peer", peer=src, msg_type=type(msg).__name__)
            elif isinstance(msg, Loaded):
                timer = self._pop_load_timer(msg.request_id, src)
                if timer is not None:
                    timer.cancel()
                self._apply(self.core.loaded(msg.request_id, src, msg.error))
            elif isinstance(msg, Logits):
                fut = self.step_waiters.get(src)
                if fut is not None and not fut.done() and msg.step == self.step_no:
                    fut.set_result(msg)
                else:
                    self.rt.log.info("decode.stale_logits", rank=src, step=msg.step, current=self.step_no)
                    if self.core.is_down(src):   # it was slow, not gone: it takes new work again
                        self.rt.log.info("decode.rank_back", rank=src)
                        self._apply(self.core.rank_up(src))
            else:
                self.bad_from_ranks += 1
                self.rt.log.warning("decode.unexpected_from_rank", peer=src, msg_type=type(msg).__name__)

    # -- the step loop ---------------------------------------------------------------------
    async def step_loop(self) -> None:
        while True:
            await self.work.wait()
            self.work.clear()
            t0 = time.perf_counter()
            while (plan := self.core.plan_step()) is not None:
                t1 = time.perf_counter()
                results = await self._run_step(plan.step, plan.runs)
                t2 = time.perf_counter()
                self._apply(self.core.complete_step(plan.step, results))
                t3 = time.perf_counter()
                # Step profile at the master: scheduling (plan), the round trip to the
                # attention ranks (their step + Run/Logits over XCCL), sampling + streaming.
                prof = self.profile
                prof["prof_steps"] += 1
                prof["prof_schedule_ms"] += (t1 - t0) * 1e3
                prof["prof_rank_rtt_ms"] += (t2 - t1) * 1e3
                prof["prof_sample_stream_ms"] += (t3 - t2) * 1e3
                t0 = t3

    async def _run_step(self, step: int, runs: tuple[tuple[str, Run], ...]) -> dict[str, Any]:
        assert self.rt is not None
        loop = asyncio.get_running_loop()
        self.step_no = step
        self.step_waiters = {rank: loop.create_future() for rank, _ in runs}
        results: dict[str, Any] = {}
        try:
            async with asyncio.timeout(self.rank_timeout_s):
                async with asyncio.TaskGroup() as tg:
                    for rank, run in runs:
                        tg.create_task(self._one_rank(rank, run, results))
        except TimeoutError:
            pass
        finally:
            self.step_waiters = {}
        for rank, _ in runs:
            results.setdefault(rank, f"attention rank {rank} did not answer step {step} "
                                     f"within {self.rank_timeout_s:g} s")
        return results

    async def _one_rank(self, rank: str, run: Run, results: dict[str, Any]) -> None:
        assert self.rt is not None
        try:
            await self.rt.endpoint.send(rank, encode(self._stamped(run)), timeout_s=self.cfg.send_timeout_s)
        except XcclError as exc:
            results[rank] = f"could not send step {run.step} to attention rank {rank}: {exc}"
            return
        msg = await self.step_waiters[rank]
        if isinstance(msg, str):
            results[rank] = msg
        else:
            results[rank] = StepRefused(msg.error) if msg.error else msg.logits

    # -- rank liveness from heartbeats -------------------------------------------------------
    def on_rank_beat(self, beat: Beat) -> None:
        """A rank cut off from every replica of some expert makes the group "degraded"."""
        if beat.service not in self.outbox or self.rt is None or self.rt.heartbeat is None or self.rt.draining:
            return
        self.cut_off[beat.service] = int(beat.load.get("experts_cut_off", 0))
        status = "degraded" if any(self.cut_off.values()) else "serving"
        if status != self.rt.heartbeat.status:
            self.rt.log.warning("decode.status", status=status, cut_off=dict(self.cut_off))
            self.rt.heartbeat.status = status

    def on_change(self, c: Change) -> None:
        """A rank declared dead loses its sequences now (not at the next step's deadline); a
        rank back with a new epoch restarted with an empty cache: what it held is lost, and it
        takes new sequences again."""
        if c.peer not in self.outbox:
            return
        assert self.rt is not None
        known = self.rank_epochs.get(c.peer)
        self.rank_epochs[c.peer] = c.epoch
        if c.new is Liveness.DEAD:
            why = f"attention rank {c.peer} is dead (no heartbeat for {self.spec.heartbeat.dead_after_s:g} s)"
            self._abandon_step(c.peer, why)
            self._apply(self.core.rank_failed(c.peer, why))
        elif c.new is Liveness.ALIVE and known is not None and c.epoch != known:
            # Restarted, perhaps before silence could declare the old process dead (a
            # supervisor restarts within a second): the old process's step will never answer.
            self.rt.log.info("decode.rank_restarted", rank=c.peer, epoch=c.epoch)
            why = f"attention rank {c.peer} restarted and lost its KV cache"
            self._abandon_step(c.peer, why)
            self._apply(self.core.rank_failed(c.peer, why) + self.core.rank_up(c.peer))

    def _abandon_step(self, rank: str, why: str) -> None:
        """The step in flight stops waiting for ``rank`` (it fails that rank's part)."""
        fut = self.step_waiters.get(rank)
        if fut is not None and not fut.done():
            fut.set_result(why)

    # -- shutdown --------------------------------------------------------------------------
    async def drain(self) -> None:
        """New admissions are refused already (rt.draining); give running sequences a moment,
        then end the rest as "cancelled" so their routers replay them elsewhere."""
        assert self.rt is not None
        self._update_idle()
        try:
            await asyncio.wait_for(self.idle.wait(), self.cfg.drain_idle_s)
        except TimeoutError:
            evicted = self.core.evict_all()
            self.rt.log.info("decode.drain_evict", sequences=sum(isinstance(e, Emit) for e in evicted))
            self._apply(evicted)


async def serve(spec: PodSpec, name: str, cfg: MasterConfig = MasterConfig()) -> None:
    me = service(spec, name)
    ranks = tuple(s.name for s in services(spec) if s.role == "attention" and s.group == me.group)
    model_cfg = ModelConfig.load(ensure_model(spec.model.dir, spec.model.preset, spec.model.seed, spec.cache_dir))
    core = DecodeCore(CoreConfig(block_size=spec.kv_pool.block_size, kv_blocks=spec.decode.kv_blocks,
                                 max_batch=spec.decode.max_batch, ranks=ranks, max_queue=cfg.max_queue,
                                 max_positions=model_cfg.max_position_embeddings))
    master = Master(spec, name, core, cfg)
    metrics.sampled("xds:decode_batch_size", "Sequences loading or running in the DP group's batch.",
                    lambda: core.count(SeqState.RUNNING) + core.count(SeqState.LOADING))
    metrics.sampled("xds:decode_queue_depth", "Admitted sequences waiting to join the batch.", lambda: core.queued)
    metrics.sampled("xds:decode_kv_blocks_used", "KV blocks reserved on the live ranks.",
                    lambda: core.total_blocks - core.free_blocks)
    metrics.sampled("xds:decode_kv_capacity_blocks", "KV blocks of the live ranks.", lambda: core.total_blocks)
    async with ServiceRuntime(spec, name, load=lambda: {**core.load(), **master.profile}) as rt:
        master.rt = rt
        rt.serve_rpc(master.on_rpc)
        beats = HeartbeatSubscriber(
            [address(spec, r, "heartbeat") for r in ranks], on_change=master.on_change, on_beat=master.on_rank_beat,
            detector=FailureDetector(DetectorConfig(spec.heartbeat.suspect_after_s, spec.heartbeat.dead_after_s)))
        await rt.mark_ready(group=me.group, ranks=list(ranks), max_batch=core.cfg.max_batch, kv_blocks=core.cfg.kv_blocks)
        await rt.run_until_stopped(master.receiver(), master.step_loop(), beats.run(),
                                   *(master.sender(r) for r in ranks), drain=master.drain)
