"""Where `xds bench serve` sends its requests: the pod's gRPC SDK (``xds-grpc``) or any
OpenAI-compatible server (``openai``: this pod's routers over HTTP, vLLM, SGLang).

A backend fills a ``serve_core.Record`` per request: start time, the time and token count of
every chunk that carried tokens, the token ids when the server returns them, and the error
(if any) as text; it never raises for one failed request (the run counts it).

The openai backend streams ``POST /v1/completions`` with ``stream_options.include_usage``
(the token count comes from ``usage``), sends the prompt as token ids (the byte tokenizer's
ids, BOS first, so the pod sees exactly what the gRPC path sees), and asks for vLLM's
``return_token_ids`` extension; ``probe`` finds out once whether the server honours it (a
server that rejects the field gets requests without it; then tokens per chunk are counted
as one and exactness cannot be checked).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Protocol

from services.bench.serve_core import Record


class Backend(Protocol):
    returns_token_ids: bool

    async def __aenter__(self) -> Backend: ...
    async def __aexit__(self, *exc: Any) -> None: ...
    async def probe(self) -> None: ...
    async def send(self, r: Record, prompt: str, prompt_ids: tuple[int, ...], max_tokens: int,
                   temperature: float, seed: int | None) -> None: ...


class GrpcBackend:
    returns_token_ids = True

    def __init__(self, endpoints: list[str], timeout_s: float) -> None:
        from services.client.sdk import InferenceClient

        self.client = InferenceClient(endpoints, timeout_s=timeout_s)

    async def __aenter__(self) -> GrpcBackend:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(*exc)

    async def probe(self) -> None:
        await self.client.model_info()   # connect before the clock starts

    async def send(self, r: Record, prompt: str, prompt_ids: tuple[int, ...], max_tokens: int,
                   temperature: float, seed: int | None) -> None:
        r.start = time.perf_counter()
        try:
            async for d in self.client.generate(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                                request_id=r.request_id):
                if d.token_ids:
                    r.add_chunk(time.perf_counter(), len(d.token_ids), d.token_ids)
        except Exception as exc:  # counted and reported, never silently dropped
            r.error = f"{type(exc).__name__}: {exc}"
        r.end = time.perf_counter()


class OpenAIError(RuntimeError):
    """A non-200 answer or an error event from the server, with what it said."""


class OpenAIBackend:
    def __init__(self, base_url: str, model: str | None, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.timeout_s = timeout_s
        self.returns_token_ids = True
        self.session: Any = None

    async def __aenter__(self) -> OpenAIBackend:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                             connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.close()

    async def probe(self) -> None:
        """Learn the model's name (first of ``GET /v1/models`` unless given) and whether the
        server returns token ids; one short request warms the path up."""
        if self.model is None:
            async with self.session.get(f"{self.base_url}/v1/models") as resp:
                if resp.status != 200:
                    raise OpenAIError(f"GET /v1/models: HTTP {resp.status}: {(await resp.text())[:300]}")
                self.model = (await resp.json())["data"][0]["id"]
        from services.model.tokenizer import encode

        ids = tuple(encode("warm up"))
        r = Record(-1, f"bench-probe-{uuid.uuid4().hex[:12]}")
        await self.send(r, "", ids, 2, 0.0, None)
        if r.error and "return_token_ids" in r.error:
            self.returns_token_ids = False
            r = Record(-1, f"bench-probe-{uuid.uuid4().hex[:12]}")
            await self.send(r, "", ids, 2, 0.0, None)
        if r.error:
            raise OpenAIError(f"probe request to {self.base_url}/v1/completions failed: {r.error}")
        if r.output_tokens and not r.token_ids:
            self.returns_token_ids = False   # the server ignored the field

    def body(self, prompt_ids: tuple[int, ...], max_tokens: int, temperature: float, seed: int | None) -> dict:
        body: dict[str, Any] = {"model": self.model, "prompt": list(prompt_ids), "max_tokens": max_tokens,
                                "temperature": temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed
        if self.returns_token_ids:
            body["return_token_ids"] = True
        return body

    async def send(self, r: Record, prompt: str, prompt_ids: tuple[int, ...], max_tokens: int,
                   temperature: float, seed: int | None) -> None:
        body = self.body(prompt_ids, max_tokens, temperature, seed)
        r.start = time.perf_counter()
        try:
            async with self.session.post(f"{self.base_url}/v1/completions", json=body,
                                         headers={"X-Request-Id": r.request_id}) as resp:
                if resp.status != 200:
                    raise OpenAIError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter()
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        break
                    self._event(r, now, json.loads(data))
        except Exception as exc:  # counted and reported, never silently dropped
            r.error = f"{type(exc).__name__}: {exc}"
        r.end = time.perf_counter()

    def _event(self, r: Record, now: float, ev: dict) -> None:
        if "error" in ev:
            raise OpenAIError(f"error event: {ev['error']}")
        if ev.get("usage"):
            r.usage_tokens = int(ev["usage"]["completion_tokens"])
        for choice in ev.get("choices") or ():
            ids = choice.get("token_ids")
            if ids:
                r.add_chunk(now, len(ids), ids)
            elif choice.get("text"):
                r.add_chunk(now, 1)   # no ids from this server: a chunk stands for one token
