"""The router's thin server: gRPC Inference servicer, per-request drivers, backend RPC clients.

It pumps client calls, backend replies, token pushes and heartbeats into ``RouterCore`` and
carries out the effects it returns. A request's *driver* task does the prefill and the Admit
and then ends: from there tokens arrive as pushes from the decode master. A ``Restart``
effect (backend lost) cancels the driver and starts a new one, which replays the request.
Client streams read ``Request.tokens`` from their cursor and sleep on a per-request event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from services.api.xds.v1 import inference_pb2 as pb
from services.api.xds.v1 import inference_pb2_grpc as pb_grpc
from services.common.heartbeat import next_slot
from services.common.logging import get_logger
from services.common.rpc import RemoteError, RpcClient, RpcTimeout
from services.common.status import Code
from services.model.config import ModelConfig
from services.model.tokenizer import IncrementalDecoder
from services.protocol.inference import Admit, Cancel, Prefill, PrefillDone, Sampling, Subscribe, Tokens
from services.protocol.kvpool import StageRelease
from services.router import api
from services.router.metrics import RouterMetrics
from services.router.core import (CallAdmit, CallPrefill, Effect, ReleaseStage, Request, Restart, RouterCore,
                                  RouterError, SendCancel,
                                  State, Subscribe as SubscribeEffect, WaitBackend, Wake)

log = get_logger()

KEEPALIVE_S = 1.0   # a stream with nothing new for this long gets an empty delta (the SDK's stall watch sees it)


def grpc_code(code: Code) -> grpc.StatusCode:
    """The one mapping from the pod's status codes to the client's gRPC status (same names)."""
    return grpc.StatusCode[Code(code).name]


class Router(pb_grpc.InferenceServicer):
    def __init__(self, name: str, core: RouterCore, model_cfg: ModelConfig, model_name: str,
                 rpc_address: Any, *, prefill_timeout_s: float = 30.0, admit_timeout_s: float = 10.0,
                 tick_s: float = 0.2) -> None:
        self.name, self.core, self.model_cfg, self.model_name = name, core, model_cfg, model_name
        self._rpc_address = rpc_address       # service name -> its rpc address
        self.prefill_timeout_s, self.admit_timeout_s = prefill_timeout_s, admit_timeout_s
        self._tick_s = tick_s
        self._clients: dict[str, RpcClient] = {}
        self._subscribed: set[str] = set()
        self._events: dict[str, asyncio.Event] = {}
        self._drivers: dict[str, asyncio.Task] = {}
        self._peer_seen = asyncio.Event()
        self._idle = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self.started = asyncio.Event()
        self.draining = False
        self.metrics = RouterMetrics(core)

    # ---------------------------------------------------------------- plumbing

    def _client(self, service: str) -> RpcClient:
        c = self._clients.get(service)
        if c is None:
            on_push = (lambda msg, src=service: self._on_push(src, msg))
            c = self._clients[service] = RpcClient(self._rpc_address(service), on_push=on_push)
        return c

    def apply(self, effects: Iterable[Effect]) -> None:
        effects = list(effects)
        self.metrics.effects(effects)
        for e in effects:
            if isinstance(e, Wake):
                ev = self._events.pop(e.request_id, None)
                if ev is not None:
                    ev.set()
                req = self.core.requests.get(e.request_id)
                if req is None or req.terminal:
                    self._stop_driver(e.request_id)
            elif isinstance(e, SendCancel):
                self._client(e.service).send(Cancel(e.request_id, self.name))
            elif isinstance(e, SubscribeEffect):
                self._subscribed.discard(e.service)
            elif isinstance(e, ReleaseStage):
                self._client(e.service).send(StageRelease(e.owner, e.stage_id))
            elif isinstance(e, Restart):   # back in the queue (ahead of new requests): dispatch restarts it
                log.warning("request.restart", request_id=e.request_id, reason=e.reason)
                self._stop_driver(e.request_id)
        if self.core.dispatch_due and self._tg is not None:
            for rid in self.core.dispatch(time.monotonic()):
                self._start_driver(rid)
        if self.draining and not any(not r.terminal for r in self.core.requests.values()):
            self._idle.set()

    def _changed(self, request_id: str) -> asyncio.Event:
        return self._events.setdefault(request_id, asyncio.Event())

    def _start_driver(self, request_id: str) -> None:
        assert self._tg is not None, "router not started"
        t = self._tg.create_task(self._drive(request_id))
        self._drivers[request_id] = t
        t.add_done_callback(lambda t, rid=request_id: self._drivers.pop(rid, None) if self._drivers.get(rid) is t else None)

    def _stop_driver(self, request_id: str) -> None:
        t = self._drivers.get(request_id)
        if t is not None and t is not asyncio.current_task():
            t.cancel()
            self._drivers.pop(request_id, None)

    def on_beat(self, beat: Any) -> None:
        self.apply(self.core.observe_beat(beat.service, beat.role, beat.group, beat.epoch, beat.status,
                                          dict(beat.load), time.monotonic()))
        self._peer_seen.set()

    def on_change(self, change: Any) -> None:
        self.apply(self.core.liveness_changed(change.peer, change.new, time.monotonic()))

    def _on_push(self, source: str, msg: Any) -> None:
        if not isinstance(msg, Tokens):
            log.warning("push.unexpected", source=source, msg_type=type(msg).__name__)
            return
        self.apply(self.core.on_tokens(msg.request_id, msg.index, tuple(msg.token_ids), msg.finish_reason,
                                       msg.error, source, time.monotonic(), msg.code))

    async def run(self) -> None:
        """Owns the drivers (one TaskGroup) and the table's clock; runs until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.started.set()
                while True:
                    now = time.monotonic()   # on the heartbeats' slots: one wake-up for both
                    await asyncio.sleep(next_slot(now, self._tick_s) - now)
                    self.apply(self.core.tick(time.monotonic()))
        finally:
            for c in self._clients.values():
                await c.close()

    async def drain(self) -> None:
        """Stop accepting (Generate answers UNAVAILABLE) and wait for live requests to end."""
        self.draining = True
        self.apply(())
        await self._idle.wait()

    # ---------------------------------------------------------------- driver

    async def _drive(self, rid: str) -> None:
        """Carries out the core's calls for one request until it has nothing left to drive
        (admitted to a DP group, finished or failed); the policy is ``RouterCore.next_call``."""
        try:
            while (call := self.core.next_call(rid, time.monotonic())) is not None:
                if isinstance(call, WaitBackend):
                    log.info("backend.wait", request_id=rid, why=call.why, left_s=round(call.wait_s, 3))
                    await self._next_beat(call.wait_s)
                elif isinstance(call, CallPrefill):
                    await self._call_prefill(call)
                else:
                    await self._call_admit(call)
        except asyncio.CancelledError:
            raise
        except RouterError as exc:
            self.apply(self.core.fail(rid, exc.code, exc.message, time.monotonic()))
        except Exception as exc:  # a driver bug fails its request, never the router
            log.exception("driver.failed", request_id=rid)
            self.apply(self.core.fail(rid, Code.INTERNAL, f"router error: {type(exc).__name__}: {exc}", time.monotonic()))

    async def heard_from(self, names: set[str], timeout_s: float) -> set[str]:
        """Wait (bounded) until every service in ``names`` is known and usable from its beats;
        returns those still missing. Readiness waits on this, so a pod reported ready routes
        over all of its backends from the first request instead of whichever beat came first."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = {n for n in names if not (n in self.core.peers and self.core.peers[n].usable)}
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return missing
            await self._next_beat(left)

    async def _next_beat(self, timeout_s: float) -> None:
        """Until the next heartbeat of any peer arrives, or ``timeout_s``."""
        self._peer_seen.clear()
        try:
            await asyncio.wait_for(self._peer_seen.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def _rpc_timeout(self, rid: str, limit_s: float) -> float:
        """A backend call's timeout: its own limit, cut at the client's deadline."""
        deadline = self.core.get(rid).deadline_s
        return limit_s if deadline is None else max(0.05, min(limit_s, deadline - time.monotonic()))

    async def _call_prefill(self, call: CallPrefill) -> None:
        """Prefill prompt + tokens already streamed; the answer goes back to the core."""
        rid, name = call.request_id, call.service
        req = self.core.get(rid)
        ids = (*req.prompt, *req.tokens)
        msg = Prefill(rid, ids, Sampling.of(req.params), position_offset=len(ids))
        timeout_s = self._rpc_timeout(rid, self.prefill_timeout_s)
        try:
            done = await self._client(name).call(msg, timeout_s=timeout_s)
        except RpcTimeout:
            self._failed(call, Code.UNAVAILABLE, f"did not answer Prefill within {timeout_s:g}s", answered=False)
        except RemoteError as exc:
            self._failed(call, exc.code, exc.message)
        else:
            if not isinstance(done, PrefillDone) or done.request_id != rid:
                raise RouterError(f"{name} answered Prefill with {type(done).__name__}", Code.INTERNAL)
            self.apply(self.core.prefill_answered(rid, done.next_token, done.kv, time.monotonic()))

    async def _call_admit(self, call: CallAdmit) -> None:
        rid, name = call.request_id, call.service
        req = self.core.get(rid)
        client = self._client(name)
        try:
            if name not in self._subscribed:
                await self._subscribe(name, client)
            await client.call(Admit(rid, len(req.prompt), Sampling.of(req.params), call.kv, req.tokens[-1],
                                    len(req.tokens), self.name), timeout_s=self.admit_timeout_s)
        except RpcTimeout:
            self._failed(call, Code.UNAVAILABLE, f"did not answer Admit within {self.admit_timeout_s:g}s",
                         answered=False)
        except RemoteError as exc:
            self._failed(call, exc.code, exc.message)
        else:
            self.core.admit_answered(rid, time.monotonic())
            self.apply(())

    def _failed(self, call: CallPrefill | CallAdmit, code: Code, message: str, *, answered: bool = True) -> None:
        self.apply(self.core.call_failed(call.request_id, call, code, message, time.monotonic(), answered=answered))
        log.warning("prefill.retry" if isinstance(call, CallPrefill) else "admit.retry",
                    request_id=call.request_id, error=self.core.get(call.request_id).last_error)

    async def _subscribe(self, name: str, client: RpcClient) -> None:
        try:
            await client.call(Subscribe(self.name), timeout_s=self.admit_timeout_s)
        except RemoteError as exc:  # an older master without Subscribe still pushes to Admit's sender
            log.warning("subscribe.refused", service=name, error=str(exc))
        self._subscribed.add(name)

    # ---------------------------------------------------------------- gRPC

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            p = api.parse_generate(request, self.model_cfg)
        except RouterError as exc:
            self.metrics.error(exc.code)
            await context.abort(grpc_code(exc.code), exc.message)
        remaining = context.time_remaining()
        try:
            async for d in self.generate(p, None if remaining is None else time.monotonic() + remaining):
                yield pb.TokenDelta(request_id=p.request_id, index=d.index, token_ids=d.token_ids, text=d.text,
                                    finish_reason=d.finish_reason)
        except RouterError as exc:   # counted by generate()
            await context.abort(grpc_code(exc.code), exc.message)

    async def generate(self, p: api.Parsed, deadline_s: float | None) -> AsyncIterator[api.Delta]:
        """The transport-neutral request path (gRPC here, HTTP beside it): open or attach to the
        request ``p`` (``deadline_s``: the client's, monotonic, or None) and yield its deltas from
        ``p.resume_from``. Raises ``RouterError`` when it is refused or fails; a caller that stops
        iterating (client gone) detaches, and the last stream leaving a live request cancels it."""
        try:
            if self.draining:
                raise RouterError(f"{self.name} is draining; use another router", Code.UNAVAILABLE)
            req, _ = self.core.open(p.request_id, p.prompt, p.params, time.monotonic(), deadline_s)
        except RouterError as exc:
            self.metrics.error(exc.code)   # errors by code, whichever front the client used
            raise
        self.core.attach(req.request_id)
        try:
            self.apply(())   # a new request may leave the queue at once
            async for delta in self._stream(req, p.resume_from):
                yield delta
        finally:
            self.apply(self.core.detach(req.request_id, time.monotonic()))
        if req.state is State.FAILED:
            self.metrics.error(req.error_code)
            raise RouterError(req.error, req.error_code)

    async def _stream(self, req: Request, resume_from: int) -> AsyncIterator[api.Delta]:
        """Deltas from ``resume_from`` on; the decoder sees every token from 0 so text never
        splits a character, even across a resume."""
        dec, fed = IncrementalDecoder(), 0
        while True:
            have = len(req.tokens)
            done = req.terminal
            if have > fed:
                skip = min(max(resume_from - fed, 0), have - fed)
                dec.feed(req.tokens[fed:fed + skip])
                start = fed + skip
                ids, text = req.tokens[start:have], dec.feed(req.tokens[start:have])
                fed = have
                if ids or (done and req.state is not State.FAILED):
                    yield api.Delta(start, tuple(ids), text + (dec.flush() if done else ""),
                                    req.finish_reason if done else "")
                    if done:
                        return
            if done:
                if req.state is not State.FAILED:
                    yield api.Delta(max(fed, resume_from), (), dec.flush(), req.finish_reason)
                return
            if not await self._until_changed(req):
                yield api.Delta(max(fed, resume_from), (), "", "")   # keep-alive: queued, not hung

    async def _until_changed(self, req: Request) -> bool:
        """Until the request changes (True), or ``KEEPALIVE_S`` passes without a change (False:
        the stream sends an empty delta so the client knows a queued request is alive), or its
        deadline (less the margin) passes: then it fails with DEADLINE_EXCEEDED where it is
        (queued, prefilling, decoding), on time for the router's own error to reach the client."""
        ev = self._changed(req.request_id)
        wait_s = KEEPALIVE_S
        if req.deadline_s is not None:
            left = req.deadline_s - self.core.cfg.deadline_margin_s - time.monotonic()
            if left <= 0:
                self.apply(self.core.expire(req.request_id, time.monotonic()))
                return True
            wait_s = min(wait_s, left)
        try:
            await asyncio.wait_for(ev.wait(), wait_s)
            return True
        except TimeoutError:
            if req.deadline_s is not None and time.monotonic() >= req.deadline_s - self.core.cfg.deadline_margin_s:
                self.apply(self.core.expire(req.request_id, time.monotonic()))
                return True
            return False

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        try:
            req = self.core.get(request.request_id)
            live = not req.terminal
            self.apply(self.core.cancel(request.request_id, time.monotonic()))
        except RouterError as exc:
            await context.abort(grpc_code(exc.code), exc.message)
        return pb.CancelResponse(cancelled=live)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return api.model_info(self.model_cfg, self.model_name)
