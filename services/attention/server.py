"""The attention rank's message handling: step messages in, replies out, MoE layers over XCCL.

Only the group's decode master drives the rank (XCCL send/recv, ``services/protocol/step.py``
messages). Messages are handled one at a time in arrival order: a Run needs the KV a previous
Load copied in, and a Free must not overtake the Run before it. Every refusal is a typed
reply carrying the reason (``Loaded.error`` / ``Logits.error``); the rank stays up.

Event ids are this rank's own: ``pack_event_id(layer, self.steps, attempt)`` with ``steps``
counting the Runs it started, so its experts' answers never depend on another group's pace;
``attempt`` grows when a failed expert instance's rows are re-dispatched to a replica inside
the step (the dispatcher's ``Failover``, settings ``experts.*`` of the pod spec).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.attention.core import AttentionCore, StepError
from services.attention.kvcache import BadKV, KVCacheError
from services.attention.metrics import AttentionMetrics
from services.common.logging import get_logger
from services.common.wire import WireError, decode, encode
from services.protocol.inference import KVRef
from services.protocol.step import Free, Load, Loaded, Logits, Run
from xccl_net.dispatch import A2EDispatcher
from xccl_net.dispatch_core import pack_event_id
from xccl_net.errors import EndpointClosed, XcclError, XcclTimeout

log = get_logger(component="attention")

KV = list[tuple[np.ndarray, np.ndarray]]
Loader = Callable[[KVRef, str], Awaitable[KV]]

# One MoE layer's bound for a dispatcher without failover (tests); the pod's dispatchers are
# bounded by ``experts.answer_timeout_s`` per attempt and ``experts.failover_wait_s``.
LAYER_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 5.0
IDLE_WAIT_S = 1.0         # a bounded wait for the next message; the loop just goes round


@dataclass(slots=True)
class StepProfile:
    """Where a decode step's time goes on the attention rank (cumulative seconds).

    local: attention, dense layers, gate, shared expert, combine, lm_head (numpy here);
    dispatch: A2E puts until every expert rank has its block; wait: from then until every
    E2A answer arrived (expert compute + E2A transfer + expert queueing; the shared expert
    overlaps it and is counted in local).
    """
    steps: int = 0
    moe_layers: int = 0
    local_s: float = 0.0
    dispatch_s: float = 0.0
    dispatch_cpu_s: float = 0.0   # this thread's CPU time in dispatch (wall time also counts preemption)
    wait_s: float = 0.0
    metrics: AttentionMetrics | None = None   # per-layer A2E/E2A histograms (the pod's ranks)

    def as_load(self) -> dict[str, float]:
        return {"prof_steps": self.steps, "prof_moe_layers": self.moe_layers, "prof_local_ms": self.local_s * 1e3,
                "prof_dispatch_ms": self.dispatch_s * 1e3, "prof_dispatch_cpu_ms": self.dispatch_cpu_s * 1e3,
                "prof_wait_ms": self.wait_s * 1e3}


async def run_step(core: AttentionCore, dispatcher: A2EDispatcher, step_no: int, request_ids: Sequence[str],
                   tokens: Sequence[int], positions: Sequence[int], *,
                   layer_timeout_s: float = LAYER_TIMEOUT_S, prof: StepProfile | None = None) -> np.ndarray:
    """One decode step: local layers here, routed experts through A2E/E2A; returns the logits.

    The shared expert is computed while the routed rows are out at the experts.
    Raises ``StepError`` (refused, nothing changed) or an ``XcclError`` (experts unreachable).
    """
    p = prof if prof is not None else StepProfile()
    clock = time.perf_counter
    t = clock()
    step = core.start(request_ids, tokens, positions)
    while (call := step.advance()) is not None:
        t1, c1 = clock(), time.thread_time()
        pending = await dispatcher.start_layer(pack_event_id(call.layer, step_no), call.h, call.ids,
                                               timeout_s=layer_timeout_s)
        t2 = clock()
        p.dispatch_cpu_s += time.thread_time() - c1
        step.compute_shared()
        t3 = clock()
        routed = await dispatcher.finish_layer(pending, call.weights)
        t4 = clock()
        step.complete(routed)
        p.local_s += (t1 - t) + (t3 - t2)
        p.dispatch_s += t2 - t1
        p.wait_s += t4 - t3
        p.moe_layers += 1
        if p.metrics is not None:
            p.metrics.layer(call.layer, t2 - t1, t4 - t3)
        t = t4
    p.local_s += clock() - t
    p.steps += 1
    assert step.logits is not None
    return step.logits


class AttentionServer:
    def __init__(self, ep: Any, core: AttentionCore, dispatcher: A2EDispatcher, load_kv: Loader, *,
                 master: str, layer_timeout_s: float = LAYER_TIMEOUT_S) -> None:
        self.ep = ep
        self.core = core
        self.dispatcher = dispatcher
        self.load_kv = load_kv
        self.master = master
        self.layer_timeout_s = layer_timeout_s
        self.steps = 0
        self.delay_s = 0.0        # a straggler (admin ``SetStraggler``): every Run waits this long first
        self.delayed_steps = 0
        self.profile = StepProfile(metrics=AttentionMetrics(dispatcher))
        self.stats = {"runs": 0, "run_errors": 0, "loads": 0, "load_errors": 0, "frees": 0,
                      "bad_messages": 0, "foreign_messages": 0, "stale_master_messages": 0}
        self.master_epoch = ""                  # the master incarnation this rank serves
        self.retired_epochs: set[str] = set()   # incarnations it served before (stale if heard again)

    def load(self) -> dict[str, float]:
        """Heartbeat load."""
        cache = self.core.cache
        d = self.dispatcher
        out = d.excluded
        return {"sequences": len(cache), "kv_blocks_used": cache.used_blocks, "kv_blocks_free": cache.free_blocks,
                "steps": self.steps, **self.profile.as_load(),
                # Expert failover: instances out now (count and bit mask by expert rank), layers
                # re-dispatched, instance failures seen, late answers dropped.
                "experts_out": len(out), "experts_out_mask": sum(1 << r for r in out),
                # Pairwise reachability: instances cut off from this rank by the fabric (mask),
                # routed experts with every holder cut (the group cannot serve: it degrades),
                # rows sent to each instance (other ranks keep using one this rank cannot reach).
                "experts_cut_mask": sum(1 << r for r in d.health.cut), "experts_cut_off": len(d.cut_off_experts()),
                "pair_cuts": d.stats["pair_cuts"], "pair_heals": d.stats["pair_heals"],
                "expert_cut_off_steps": d.stats["cut_off"],
                **{f"rows_to_expert_{r}": n for r, n in enumerate(d.rows_to)},
                "replica_moves": d.chooser.moved if d.chooser is not None else 0,
                "straggler_ms": self.delay_s * 1e3, "delayed_steps": self.delayed_steps,
                "expert_retries": d.stats["retries"], "expert_failures": d.stats["rank_failures"],
                "expert_stale_answers": d.stats["stale_notices"], "expert_unavailable": d.stats["unavailable"]}

    async def serve(self) -> None:
        """Handle the master's messages until cancelled."""
        while True:
            try:
                src, frames = await self.ep.recv(timeout_s=IDLE_WAIT_S)
            except XcclTimeout:
                continue
            except EndpointClosed:
                raise
            except XcclError as exc:  # a peer's garbage, reported by the transport
                self.stats["bad_messages"] += 1
                log.warning("attention.bad_transfer", error=type(exc).__name__, detail=str(exc))
                continue
            if src != self.master:
                self.stats["foreign_messages"] += 1
                log.warning("attention.foreign_message", src=src, master=self.master)
                continue
            reply = await self.handle_frames(frames)
            if reply is not None:
                try:
                    await self.ep.send(self.master, encode(reply), timeout_s=REPLY_TIMEOUT_S)
                except XcclError as exc:
                    log.warning("attention.reply_failed", master=self.master, error=type(exc).__name__,
                                detail=str(exc))

    async def handle_frames(self, frames: list[Any]) -> Loaded | Logits | None:
        try:
            msg = decode(frames)
        except WireError as exc:
            self.stats["bad_messages"] += 1
            log.warning("attention.bad_message", error=type(exc).__name__, detail=str(exc))
            return self._logits_error(-1, f"undecodable message: {type(exc).__name__}: {exc}")
        return await self.handle(msg)

    def _master_incarnation(self, epoch: str) -> bool:
        """Track the master's incarnation. A new one (the master restarted) owns none of the
        sequences the old one left here: they are dropped, so its KV budget is whole again.
        An incarnation already replaced is stale (a hung master continued): False."""
        if not epoch or epoch == self.master_epoch:
            return True
        if epoch in self.retired_epochs:
            self.stats["stale_master_messages"] += 1
            return False
        if self.master_epoch:
            self.retired_epochs.add(self.master_epoch)
            held = self.core.cache.request_ids()
            self.core.cache.free(held)
            log.info("attention.master_restarted", master=self.master, epoch=epoch, dropped=len(held))
        self.master_epoch = epoch
        return True

    async def handle(self, msg: object) -> Loaded | Logits | None:
        if isinstance(msg, (Run, Load, Free)) and not self._master_incarnation(msg.master_epoch):
            log.warning("attention.stale_master", msg_type=type(msg).__name__, epoch=msg.master_epoch)
            # Answered (the old incarnation may still be waiting) but never acted on.
            why = "from a replaced incarnation of the master"
            if isinstance(msg, Load):
                return Loaded(request_id=msg.request_id, error=why)
            return self._logits_error(msg.step, why) if isinstance(msg, Run) else None
        if isinstance(msg, Run):
            return await self._run(msg)
        if isinstance(msg, Load):
            return await self._load(msg)
        if isinstance(msg, Free):
            unknown = self.core.cache.free(msg.request_ids)
            self.stats["frees"] += len(msg.request_ids) - len(unknown)
            if unknown:
                log.info("attention.free_unknown", request_ids=unknown)
            return None
        self.stats["bad_messages"] += 1
        log.warning("attention.unexpected_message", msg_type=type(msg).__name__)
        return self._logits_error(-1, f"the attention rank does not handle {type(msg).__name__}")

    async def _run(self, msg: Run) -> Logits:
        step_no = self.steps
        self.steps += 1
        if self.delay_s > 0:
            self.delayed_steps += 1
            await asyncio.sleep(self.delay_s)
        try:
            logits = await run_step(self.core, self.dispatcher, step_no, msg.request_ids, msg.tokens, msg.positions,
                                    layer_timeout_s=self.layer_timeout_s, prof=self.profile)
        except (StepError, XcclError, ValueError) as exc:
            self.stats["run_errors"] += 1
            log.warning("attention.run_failed", step=msg.step, error=type(exc).__name__, detail=str(exc))
            return self._logits_error(msg.step, f"{type(exc).__name__}: {exc}")
        self.stats["runs"] += 1
        return Logits(step=msg.step, logits=logits)

    async def _load(self, msg: Load) -> Loaded:
        from services.kvpool.client import KVPoolError
        from services.kvpool.layout import KVLayoutError

        try:
            if not 1 <= msg.kv.num_tokens < msg.capacity:
                raise BadKV(f"KV of {msg.kv.num_tokens} positions for a capacity of {msg.capacity}")
            self.core.cache.check_room(msg.request_id, msg.capacity)  # before fetching anything
            kv = await self.load_kv(msg.kv, msg.request_id)
            self.core.cache.adopt(msg.request_id, kv, msg.kv.num_tokens, msg.capacity)
        except (KVCacheError, KVPoolError, KVLayoutError, XcclError) as exc:
            self.stats["load_errors"] += 1
            log.warning("attention.load_failed", request_id=msg.request_id, error=type(exc).__name__,
                        detail=str(exc))
            return Loaded(request_id=msg.request_id, error=f"{type(exc).__name__}: {exc}")
        self.stats["loads"] += 1
        return Loaded(request_id=msg.request_id)

    def _logits_error(self, step: int, error: str) -> Logits:
        return Logits(step=step, logits=np.zeros((0, self.core.cfg.vocab_size), np.float32), error=error)

