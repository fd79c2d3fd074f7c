"""The router's OpenAI-compatible HTTP front: ``/v1/completions``, ``/v1/chat/completions``
(``stream`` false or true, Server-Sent Events), ``/v1/models`` and ``/health``.

A thin server over the router's one request path, ``Router.generate`` (the same one gRPC's
``Generate`` wraps): mapping JSON <-> ``api.Parsed``/``api.Delta`` is ``openai_api`` (pure).

Library: aiohttp's web server. It runs on the loop the router already owns (beside grpc.aio,
started and stopped by ``AppRunner``/``TCPSite`` like any other task), it has nothing to
configure for streaming (``StreamResponse.write`` is the SSE writer), it cancels a handler
whose client disconnected (``handler_cancellation=True``, aiohttp >= 3.9: that is how a gone
client cancels its request here), and it is one well-kept dependency. FastAPI + uvicorn (what
vLLM uses) would add pydantic, starlette and a server that wants to own the loop and the
signals; the validation it brings is what ``openai_api`` does in a few explicit lines.

Behaviour:
- ``X-Request-Id`` (optional) is the request's idempotency key, as ``request_id`` in gRPC:
  the same id and prompt attach to the running request; it is echoed in the response.
- ``X-Request-Timeout`` (optional, seconds) is the client's deadline, as gRPC's deadline.
- Errors are OpenAI's error object, with the status of the router's code (``openai_api``):
  400 bad input (malformed JSON included), 404 unknown model, 429 RESOURCE_EXHAUSTED, 503
  UNAVAILABLE, 504 DEADLINE_EXCEEDED. Once a stream has started, an error is sent as one
  ``data: {"error": ...}`` event, then ``data: [DONE]``.
- A stop string ends the stream at the token that completes it, and leaving the router's
  stream then cancels the request there (as does a client that disconnects).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from services.common.logging import get_logger
from services.router import api
from services.router import openai_api as oa
from services.router.core import RouterError

log = get_logger()
MAX_BODY_BYTES = 4 << 20
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200, rid: str | None = None) -> web.Response:
    headers = {"X-Request-Id": rid} if rid else None
    return web.json_response(obj, status=status, headers=headers, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as OpenAI's error object: aiohttp's own (404 route, 405, 413) and bugs (500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json(oa.ApiError(exc.status, exc.reason).body(), exc.status)
    except Exception as exc:   # a bug answers 500 for this request; the router stays up
        log.exception("http.failed", path=request.path)
        return _json(oa.ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body(), 500)


class HttpFront:
    """``router`` offers ``generate(parsed, deadline_s)``, ``model_cfg`` and ``model_name``;
    ``ready()`` says whether ``/health`` answers 200."""

    def __init__(self, router: Any, ready: Callable[[], bool]) -> None:
        self.router, self.ready = router, ready
        self.app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY_BYTES)
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.get("/v1/models", self.models), web.get("/health", self.health)])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the bound port."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ endpoints

    async def health(self, request: web.Request) -> web.Response:
        ok = self.ready()
        return _json({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    async def models(self, request: web.Request) -> web.Response:
        return _json(oa.models(self.router.model_name, self.router.model_cfg, oa.now_s()))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    # ------------------------------------------------------------------ generation

    async def _generate(self, request: web.Request, kind: oa.Kind) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or api.new_request_id()
        try:
            oa.check_request_id(rid)
            deadline_s = self._deadline(request)
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError as exc:   # JSONDecodeError and UnicodeDecodeError
                raise oa.bad(f"the request body is not valid JSON: {exc}") from None
            req = oa.parse_request(kind, body, self.router.model_cfg, self.router.model_name, rid)
        except oa.ApiError as exc:
            return _json(exc.body(), exc.status, rid if exc.param != "X-Request-Id" else None)
        # Leaving this block (done, stop string, error, client gone) leaves the router's
        # stream at once: the last stream of a live request cancels it.
        async with contextlib.aclosing(self.router.generate(req.parsed, deadline_s)) as deltas:
            if req.stream:
                return await self._stream(request, req, deltas)
            return await self._whole(req, deltas)

    @staticmethod
    def _deadline(request: web.Request) -> float | None:
        v = request.headers.get("X-Request-Timeout")
        if v is None:
            return None
        try:
            t = float(v)
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and t > 0):
            raise oa.ApiError(400, f"X-Request-Timeout must be a positive number of seconds, got {v!r}",
                              param="X-Request-Timeout", code="invalid_argument")
        return time.monotonic() + t

    async def _whole(self, req: oa.OpenAIRequest, deltas: AsyncIterator[api.Delta]) -> web.Response:
        text, reason = oa.TextStream(req.stops), ""
        parts: list[str] = []
        try:
            async for d in deltas:
                parts.append(text.feed(d)[0])
                if text.stopped or d.finish_reason:
                    reason = oa.finish_reason(d.finish_reason, text.stopped)
                    break
        except RouterError as exc:
            err = oa.ApiError.from_code(exc.code, exc.message)
            return _json(err.body(), err.status, req.parsed.request_id)
        body = oa.response(req, "".join(parts), tuple(text.token_ids), reason, oa.now_s())
        return _json(body, 200, req.parsed.request_id)

    async def _stream(self, request: web.Request, req: oa.OpenAIRequest,
                      deltas: AsyncIterator[api.Delta]) -> web.StreamResponse:
        """SSE. The first delta is awaited before the headers go out, so a refused request
        (no backend, queue full, bad deadline) is still an HTTP error status."""
        rid, created = req.parsed.request_id, oa.now_s()
        try:
            first = await anext(deltas)
        except RouterError as exc:
            err = oa.ApiError.from_code(exc.code, exc.message)
            return _json(err.body(), err.status, rid)
        resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": rid})
        await resp.prepare(request)
        text = oa.TextStream(req.stops)
        try:
            d: api.Delta | None = first
            is_first = True
            while d is not None:
                if not d.token_ids and not d.text and not d.finish_reason:
                    await resp.write(b": keep-alive\n\n")   # the request waits (queued): an SSE comment
                    d = await anext(deltas, None)
                    continue
                piece, ids = text.feed(d)
                done = text.stopped or bool(d.finish_reason)
                reason = oa.finish_reason(d.finish_reason, text.stopped) if done else None
                await resp.write(_event(oa.chunk(req, piece, ids, reason, created, first=is_first)))
                is_first = False
                if done:
                    break
                d = await anext(deltas, None)
            if req.include_usage:
                await resp.write(_event(oa.usage_chunk(req, len(text.token_ids), created)))
        except RouterError as exc:
            await resp.write(_event(oa.ApiError.from_code(exc.code, exc.message).body()))
        except ConnectionResetError:   # the client left between two chunks
            return resp
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
