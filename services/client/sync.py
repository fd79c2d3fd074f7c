"""Blocking wrapper for scripts: one private event loop in a daemon thread per client.

The loop (and the gRPC channels, which belong to it) lives as long as the client; ``close()``
(or leaving the ``with`` block) closes the channels, stops the loop and joins the thread, so
nothing leaks. Every wait on the loop is bounded by the client's timeout plus a margin.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from services.client.sdk import Completion, Delta, InferenceClient, ModelInfo, new_request_id

_MARGIN_S = 5.0


class SyncInferenceClient:
    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._client = InferenceClient(endpoints, timeout_s=timeout_s)  # validates before a thread exists
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xds-client-loop", daemon=True)
        self._thread.start()

    def _run(self, coro: Any) -> Any:
        if self._closed:
            coro.close()
            raise RuntimeError("SyncInferenceClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s + _MARGIN_S)

    def __enter__(self) -> SyncInferenceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._run(self._client.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_MARGIN_S)
            self._loop.close()

    def generate(self, prompt: str | Sequence[int], **kw: Any) -> Iterator[Delta]:
        kw.setdefault("request_id", new_request_id())
        agen = self._client.generate(prompt, **kw)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run(agen.aclose())

    def complete(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        return self._run(self._client.complete(prompt, **kw))

    def cancel(self, request_id: str) -> bool:
        return self._run(self._client.cancel(request_id))

    def model_info(self) -> ModelInfo:
        return self._run(self._client.model_info())
