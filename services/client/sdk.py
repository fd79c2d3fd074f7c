"""Client SDK for the pod's routers (gRPC ``xds.v1.Inference``).

Fail-over rule: endpoints are tried in order, starting from the last one that worked; a
router that is unreachable or answers UNAVAILABLE (down, draining, or without a live backend)
is skipped. A stream that breaks with UNAVAILABLE resumes on the next router with the same
request id and ``resume_from`` = tokens received, so the caller sees one unbroken stream:
decoding is deterministic per request id, so a fresh run elsewhere reproduces the prefix it
skips. Every request gets an id (the SDK makes one when the caller gives none) because that
resume needs it. Any other status is raised as its typed ``XdsClientError``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api.xds.v1 import inference_pb2 as pb
from services.api.xds.v1 import inference_pb2_grpc as pb_grpc
from services.client.errors import DeadlineExceeded, Internal, NotFound, Unavailable, XdsClientError, from_rpc_error

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delta:
    index: int                    # output position of token_ids[0]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str            # "" until the last delta: "stop" | "length" | "cancelled"


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str

    def to_json(self) -> dict:
        return {"token_ids": list(self.token_ids), "text": self.text, "finish_reason": self.finish_reason}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_name: str
    vocab_size: int
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


class _Hung(Exception):
    """A router stopped answering mid-stream (internal: the request fails over)."""


def new_request_id() -> str:
    return f"sdk-{uuid.uuid4().hex}"


class InferenceClient:
    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = 60.0, stall_s: float = 2.0,
                 probe_s: float = 1.0) -> None:
        """``stall_s``: when a stream brings nothing for this long, the router is asked for its
        health on the same connection; no answer within ``probe_s`` means it is hung (SIGSTOP,
        a wedged loop: its TCP connections stay open), and the request fails over to the next
        router, resuming by request id. A busy router answers its health check and is waited for."""
        if not endpoints:
            raise ValueError("InferenceClient needs at least one endpoint (host:port)")
        for key, v in (("timeout_s", timeout_s), ("stall_s", stall_s), ("probe_s", probe_s)):
            if not v > 0:
                raise ValueError(f"{key} must be > 0, got {v}")
        self.endpoints = list(endpoints)
        self.timeout_s, self.stall_s, self.probe_s = timeout_s, stall_s, probe_s
        self._good = 0                          # index of the endpoint that last worked
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._owner: dict[str, str] = {}        # request id -> endpoint streaming it (for cancel)

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = grpc.aio.insecure_channel(endpoint)
        return ch

    def _stub(self, endpoint: str) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self._channel(endpoint))

    async def _answers(self, endpoint: str) -> bool:
        """Does the router answer a health check (any status) within ``probe_s``?"""
        try:
            await health_pb2_grpc.HealthStub(self._channel(endpoint)).Check(
                health_pb2.HealthCheckRequest(), timeout=self.probe_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return True

    async def _messages(self, call: Any, endpoint: str) -> AsyncIterator[Any]:
        """The stream's messages; raises ``_Hung`` when it stalls and the router does not answer.

        One watchdog per stream (not a task and a wait per message): it sleeps until
        ``stall_s`` after the last message, then probes; a router that does not answer gets
        the call cancelled, which ends the read here as ``_Hung``."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        hung = ""

        async def watch() -> None:
            nonlocal hung, last
            while True:
                left = last + self.stall_s - loop.time()
                if left > 0:
                    await asyncio.sleep(left)
                elif await self._answers(endpoint):
                    last = loop.time()    # busy, not hung: watch again
                else:
                    hung = (f"{endpoint}: sent nothing for {self.stall_s:g}s and did not answer a health "
                            f"check within {self.probe_s:g}s (hung)")
                    call.cancel()
                    return

        watchdog = asyncio.create_task(watch())
        try:
            while True:
                try:
                    msg = await call.read()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if hung and (task is None or not task.cancelling()):   # ours, not our caller's cancel
                        raise _Hung(hung) from None
                    raise
                except grpc.aio.AioRpcError as exc:
                    if hung and exc.code() == grpc.StatusCode.CANCELLED:
                        raise _Hung(hung) from None
                    raise
                if msg is grpc.aio.EOF:
                    return
                last = loop.time()
                yield msg
        finally:
            watchdog.cancel()

    def _order(self, first: str | None = None) -> list[str]:
        eps = self.endpoints[self._good:] + self.endpoints[:self._good]
        if first in eps:
            eps.remove(first)
            eps.insert(0, first)
        return eps

    def _remember(self, endpoint: str) -> None:
        self._good = self.endpoints.index(endpoint)

    async def _unary(self, call: Callable[[pb_grpc.InferenceStub, float], Awaitable[T]],
                     first: str | None = None) -> tuple[T, str]:
        failures = []
        for ep in self._order(first):
            try:
                out = await call(self._stub(ep), self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(exc) from None
                failures.append(f"{ep}: {exc.details()}")
                continue
            self._remember(ep)
            return out, ep
        raise Unavailable("no router available: " + "; ".join(failures))

    async def model_info(self) -> ModelInfo:
        m, _ = await self._unary(lambda s, t: s.GetModelInfo(pb.ModelInfoRequest(), timeout=t))
        return ModelInfo(m.model_name, m.vocab_size, m.max_position_embeddings, m.bos_token_id,
                         m.eos_token_id, m.pad_token_id)

    async def cancel(self, request_id: str) -> bool:
        """True if a running request was cancelled, False if it had already ended; NotFound
        if no reachable router knows the id. The router streaming it is asked first."""
        missing, down = [], []
        for ep in self._order(self._owner.get(request_id)):
            try:
                r = await self._stub(ep).Cancel(pb.CancelRequest(request_id=request_id), timeout=self.timeout_s)
                return bool(r.cancelled)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    missing.append(f"{ep}: {exc.details()}")
                elif exc.code() == grpc.StatusCode.UNAVAILABLE:
                    down.append(f"{ep}: {exc.details()}")
                else:
                    raise from_rpc_error(exc) from None
        if missing:
            raise NotFound(f"request {request_id!r} is unknown: " + "; ".join(missing + down))
        raise Unavailable("no router available: " + "; ".join(down))

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), request_id: str | None = None) -> AsyncIterator[Delta]:
        """Stream deltas. ``prompt`` is text, or token ids. Leaving the iteration early (break,
        cancellation) closes the stream, which cancels the request at the router."""
        rid = request_id or new_request_id()
        sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                     stop_token_ids=list(stop_token_ids), seed=seed)
        if isinstance(prompt, str):
            base = pb.GenerateRequest(request_id=rid, prompt=prompt, sampling=sampling)
        else:
            base = pb.GenerateRequest(request_id=rid, prompt_token_ids=pb.TokenIds(ids=list(prompt)), sampling=sampling)
        return self._generate(rid, base)

    async def _generate(self, rid: str, base: pb.GenerateRequest) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received, misses, failures = 0, 0, []
        order = self._order()
        i = 0
        try:
            while True:
                ep = order[i % len(order)]
                req = pb.GenerateRequest()
                req.CopyFrom(base)
                req.resume_from = received
                left = deadline - loop.time()
                if left <= 0:
                    raise DeadlineExceeded(f"request {rid!r} did not finish within {self.timeout_s:g}s")
                self._owner[rid] = ep
                call = self._stub(ep).Generate(req, timeout=left)
                progressed = False
                try:
                    async for d in self._messages(call, ep):
                        if d.index != received and (d.token_ids or not d.finish_reason):
                            raise Internal(f"{ep} sent index {d.index} for request {rid!r}, expected {received}")
                        if not d.token_ids and not d.finish_reason and not d.text:
                            continue   # the router's keep-alive: the request waits (queued), it is not hung
                        received += len(d.token_ids)
                        progressed = progressed or bool(d.token_ids)
                        self._remember(ep)
                        yield Delta(d.index, tuple(d.token_ids), d.text, d.finish_reason)
                        if d.finish_reason:
                            return
                    failures.append(f"{ep}: stream ended without a finish reason")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise from_rpc_error(exc) from None
                    failures.append(f"{ep}: {exc.details()}")
                except _Hung as exc:
                    failures.append(str(exc))
                finally:
                    call.cancel()
                misses = 0 if progressed else misses + 1
                if misses >= len(order):
                    raise Unavailable(f"request {rid!r}: no router could serve it: " + "; ".join(failures[-len(order):]))
                i += 1
        finally:
            self._owner.pop(rid, None)

    async def complete(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        rid = kw.pop("request_id", None) or new_request_id()
        ids: list[int] = []
        text: list[str] = []
        finish = ""
        async for d in self.generate(prompt, request_id=rid, **kw):
            ids += d.token_ids
            text.append(d.text)
            finish = d.finish_reason
        return Completion(rid, tuple(ids), "".join(text), finish)


__all__ = ["InferenceClient", "Delta", "Completion", "ModelInfo", "XdsClientError"]
