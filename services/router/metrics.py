"""The router's Prometheus metrics, observed from what the servicer already sees: the core's
effects (``Wake``: a request's tokens or state changed; ``Restart``: a replay) and the request
table itself. No change to the core; the servicer calls ``RouterMetrics.effects`` once per
``apply`` and ``error`` where a client gets an error status.

Per request (the first time it is seen streaming tokens / ending):
- TTFT: first token - request opened; TPOT: per push after the first, the interval since the
  previous push over the tokens it brought (vLLM's inter-token latency); e2e: end - opened.
- prompt tokens once per request (at its first token), generation tokens as they stream;
  a replay re-prefills prompt + streamed tokens but they are counted once.
- ``request_success_total{finished_reason}``: stop / length / cancelled, as the client sees it.
Running = prefilling or decoding, waiting = in the table without a backend; sampled at scrape.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.common import metrics as m
from services.common.status import Code
from services.router.core import Request, RouterCore, State
from services.router.effects import Restart, Wake


@dataclass(slots=True)
class _Seen:
    req: Request              # the run we follow (a failed id reopened is a new Request)
    tokens: int = 0
    last_token_s: float = 0.0
    ended: bool = False       # counted as ended; later wakes of it (detach, re-attach) count nothing


class RouterMetrics:
    def __init__(self, core: RouterCore, clock: Any = time.monotonic) -> None:
        self.core, self.clock = core, clock
        self._seen: dict[str, _Seen] = {}
        self.ttft = m.histogram("xds:time_to_first_token_seconds", "Time to first token (router: request "
                                "opened -> first token streamed).", m.TTFT_BUCKETS)
        self.tpot = m.histogram("xds:time_per_output_token_seconds", "Time per output token after the first "
                                "(per token push: interval / tokens in it).", m.TPOT_BUCKETS)
        self.e2e = m.histogram("xds:e2e_request_latency_seconds", "End-to-end request latency (opened -> "
                               "finished, cancelled or failed).", m.E2E_BUCKETS)
        self.prompt_tokens = m.counter("xds:prompt_tokens", "Prompt tokens of requests that started streaming.")
        self.generation_tokens = m.counter("xds:generation_tokens", "Output tokens streamed to clients.")
        self.success = m.counter("xds:request_success", "Requests ended without error, by finish reason.",
                                 ("finished_reason",))
        self.replays = m.counter("xds:request_replays", "Replays (migrations) of a request to another "
                                 "backend after one was lost.")
        self.errors = m.counter("xds:request_errors", "Errors returned to clients, by status code.", ("code",))
        m.sampled("xds:num_requests_running", "Requests prefilling or decoding.", lambda: self._count(
            (State.PREFILLING, State.DECODING)))
        m.sampled("xds:num_requests_waiting", "Requests in the table waiting for a backend.",
                  lambda: self._count((State.ADMITTED,)))

    def _count(self, states: tuple[State, ...]) -> int:
        return sum(1 for r in self.core.requests.values() if r.state in states)

    def effects(self, effects: Iterable[Any]) -> None:
        for e in effects:
            if isinstance(e, Wake):
                self._changed(e.request_id)
            elif isinstance(e, Restart):
                self.replays.inc()
        if len(self._seen) > 2 * len(self.core.requests) + 64:   # forget runs the table forgot
            self._seen = {k: v for k, v in self._seen.items() if self.core.requests.get(k) is v.req}

    def error(self, code: Code) -> None:
        self.errors.labels(Code(code).name).inc()

    def _changed(self, rid: str) -> None:
        req = self.core.requests.get(rid)
        if req is None:
            return
        seen = self._seen.get(rid)
        if seen is None or seen.req is not req:
            seen = self._seen[rid] = _Seen(req)
        if seen.ended:
            return
        now = self.clock()
        have = len(req.tokens)
        if have > seen.tokens:
            if seen.tokens == 0:
                self.ttft.observe(now - req.created_s)
                self.prompt_tokens.inc(len(req.prompt))
            else:
                self.tpot.observe((now - seen.last_token_s) / (have - seen.tokens))
            self.generation_tokens.inc(have - seen.tokens)
            seen.tokens, seen.last_token_s = have, now
        if req.terminal:
            seen.ended = True
            self.e2e.observe((req.ended_s if req.ended_s is not None else now) - req.created_s)
            if req.state is not State.FAILED:
                self.success.labels(req.finish_reason).inc()
