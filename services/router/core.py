"""Router pure core: the in-flight request table, its lifecycle, and the backend-picking policy.

No sockets, no asyncio, no clock of its own: the servicer feeds it client calls, backend
replies, token pushes and heartbeat observations with ``now``, and carries out the effects
it returns (``SendCancel``, ``Subscribe``, ``Wake``, ``Restart``).

The retry driver is here too: a request's driver asks ``next_call`` what to do (``CallPrefill``,
``CallAdmit``, ``WaitBackend``, or nothing: it is done) and feeds the outcome back
(``prefill_answered``, ``admit_answered``, ``call_failed``); retry-versus-fail is
``status.retry_elsewhere``/``status.retryable``.

Rules (the invariants the servicer and the tests rely on):
- ``Request.tokens`` is every output token streamed so far, position ``i`` at index ``i``.
  It only grows, never skips or repeats a position: a push that overlaps what we have must
  agree with it (determinism), a push that leaves a gap is a peer violation.
- A request id is an idempotency key. Opening a live id with the same prompt and sampling
  attaches to it; with anything else it is refused. A finished id is kept for
  ``retain_finished_s`` so a client that lost the tail can attach and read it again; a
  failed or cancelled id is replaced by a fresh run (the tokens are deterministic, so a
  fresh run reproduces what a client already has and ``resume_from`` skips it).
- Migration is a replay: ``RESTART`` sends a request back to ``admitted``; the driver then
  prefills prompt + tokens already streamed and admits it to another DP group, whose
  output continues at index ``len(tokens)``.
- Liveness and load come only from heartbeats. A prefill declared dead by silence that beats
  again in the same epoch (it was hung: SIGSTOP, a wedged loop, then continued) is usable again:
  it holds nothing of ours (whatever it was computing was replayed, and its late answers go
  to RPC calls nobody waits for), so taking new work from it is safe. The detector calls an
  epoch's death final, so the core watches such a peer's silence itself (``dead_after_s``).
  A decode master stays dead for its epoch (its sequences were replayed; its late pushes are
  strays, answered with a Cancel).
- Admission: a new request waits in the router's bounded FCFS queue (``max_waiting``; full:
  RESOURCE_EXHAUSTED naming ``routing.max_waiting``) until a prefill and a DP group have room
  for it (``services.router.admission``); a replay (its backend was lost) goes ahead of new
  requests. ``dispatch`` says which leave the queue now; the servicer starts their drivers.
- Deadlines: a request whose client deadline passes (less ``deadline_margin_s``) fails with
  DEADLINE_EXCEEDED wherever it is (``expire``): queued, prefilling (the prefill is told to
  drop it), prefilled (its staged KV is released) or decoding (the group is told to stop).
- Waiting for a backend: with no live prefill or decode group (dead, hung, busy, or not
  heard from yet), a request waits for one instead of failing, until its deadline (the
  client's, less ``deadline_margin_s`` so the router's own error reaches it: DEADLINE_EXCEEDED
  naming the backends) or, without one, ``backend_wait_s`` after it started waiting
  (UNAVAILABLE). Busy (RESOURCE_EXHAUSTED) is never a reason to give up early.
- A decode group's UNAVAILABLE push (its rank died, it lost the sequence) is replayed
  elsewhere like a lost backend, not forwarded to the client.
"""

from __future__ import annotations

from typing import Any

from services.common.liveness import Liveness
from services.common.status import Code, retry_elsewhere, retryable
from services.router import admission
from services.router.table import (_LIVE, TERMINAL, TRANSITIONS, Event, IllegalTransition, Peer, Request,
                                   RouterConfig, State)
from services.router.effects import (Call, CallAdmit, CallPrefill, Effect, InvalidRequestError, NoBackend,
                                     ReleaseStage, Restart, RouterError, SendCancel, Subscribe, TableFull,
                                     UnknownRequest, WaitBackend, Wake)
from services.model.sampling import SamplingParams


class RouterCore:
    def __init__(self, cfg: RouterConfig = RouterConfig()) -> None:
        self.cfg = cfg
        self.requests: dict[str, Request] = {}
        self.peers: dict[str, Peer] = {}
        self.stray_pushes = 0        # token pushes for requests we do not (or no longer) drive
        self.revived = 0             # hung prefills taken back into service
        self.waiting: dict[str, None] = {}   # the admission queue, FCFS (an ordered set)
        self.replays: dict[str, None] = {}   # requests sent back by a lost backend: ahead of new ones
        self.dispatch_due = False    # something changed that may let queued requests go
        self.expired = 0             # requests failed at their deadline

    # ---------------------------------------------------------------- lifecycle

    def _fire(self, req: Request, event: Event, now: float) -> None:
        new = TRANSITIONS.get((req.state, event))
        if new is None:
            raise IllegalTransition(req.request_id, req.state, event)
        req.state = new
        if new in TERMINAL:
            req.ended_s = now
            self.dispatch_due = True

    def get(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None:
            raise UnknownRequest(f"no request with id {request_id!r} on this router")
        return req

    def open(self, request_id: str, prompt: tuple[int, ...], params: SamplingParams,
             now: float, deadline_s: float | None = None) -> tuple[Request, bool]:
        """The request for this id, and whether it is new (the caller then starts its driver).
        ``deadline_s``: the client's deadline (monotonic) or None; a stream attaching to a live
        request extends its deadline to the latest one asked for (none: no bound)."""
        old = self.requests.get(request_id)
        if old is not None:
            same = old.prompt == prompt and old.params == params
            if same and old.state in (*_LIVE, State.FINISHED):
                if old.deadline_s is not None:
                    old.deadline_s = None if deadline_s is None else max(old.deadline_s, deadline_s)
                return old, False
            if not same and not old.terminal:
                raise InvalidRequestError(
                    f"request id {request_id!r} is in use by a running request with a different prompt "
                    "or sampling parameters")
            if old.streams:
                raise InvalidRequestError(f"request id {request_id!r} is still being streamed to another client")
            del self.requests[request_id]
        queued = len(self.waiting) + len(self.replays)
        if queued >= self.cfg.max_waiting:
            raise TableFull(f"{self.cfg.name}'s waiting queue is full: {queued} requests wait for a backend with room "
                            f"(routing.max_waiting = {self.cfg.max_waiting}); retry later or raise it")
        if len(self.requests) >= self.cfg.max_requests:
            self._evict_oldest_terminal()
            if len(self.requests) >= self.cfg.max_requests:
                raise TableFull(f"{self.cfg.name} has {len(self.requests)} requests in its table "
                                f"(limit {self.cfg.max_requests})")
        req = Request(request_id, prompt, params, now, last_progress_s=now, deadline_s=deadline_s)
        self.requests[request_id] = req
        self.waiting[request_id] = None
        self.dispatch_due = True
        return req, True

    # ---------------------------------------------------------------- admission

    def queued(self, request_id: str) -> bool:
        return request_id in self.waiting or request_id in self.replays

    def _dequeue(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)
        self.replays.pop(request_id, None)

    def dispatch(self, now: float) -> list[str]:
        """The queued requests that may go now (their drivers start): as many of the queue's
        head as there is room for downstream (``services.router.admission``). With no usable
        backend of a role at all (none alive, none heard from), every queued request goes to
        its driver, which waits for one as long as its deadline or ``backend_wait_s`` allows."""
        self.dispatch_due = False
        queue = [*self.replays, *self.waiting]
        if not queue:
            return []
        rooms = admission.rooms(self.peers, self._inflight(), max_batch=self.cfg.max_batch,
                                decode_slack=self.cfg.decode_slack)
        if not rooms.prefill or not rooms.decode:
            n = len(queue)
        else:
            others = sum(1 for p in self.peers.values()
                         if p.role == "router" and p.usable and p.load.get("queued", 0.0) > 0)
            bs = self.cfg.kv_block_size
            n = admission.admit_count(rooms, (self.requests[rid].kv_blocks_needed(bs) for rid in queue),
                                      routers_waiting=others)
        out = queue[:n]
        for rid in out:
            self._dequeue(rid)
            self.requests[rid].waiting_since_s = None
        return out

    def _inflight(self) -> list[admission.InFlight]:
        bs = self.cfg.kv_block_size
        out = []
        for rid, r in self.requests.items():
            if r.terminal or rid in self.waiting or rid in self.replays:
                continue
            if r.state is State.DECODING and r.decode:
                out.append(admission.InFlight(decode=r.decode, admitted_s=r.admitted_s,
                                              kv_blocks=r.kv_blocks_needed(bs)))
            elif r.state is State.PREFILLING:
                out.append(admission.InFlight(prefill=r.prefill, prefill_sent_s=r.prefill_sent_s))
            else:
                out.append(admission.InFlight())
        return out

    def expire(self, request_id: str, now: float) -> list[Effect]:
        """The client's deadline passed: fail it with DEADLINE_EXCEEDED, saying where it was."""
        req = self.requests.get(request_id)
        if req is None or req.terminal:
            return []
        self.expired += 1
        if self.queued(request_id):
            queue = [*self.replays, *self.waiting]
            where = (f"waited {now - req.created_s:.1f}s in {self.cfg.name}'s queue ({queue.index(request_id)} "
                     f"ahead of it) for a prefill and a DP group with room")
        elif req.state is State.PREFILLING:
            where = f"was prefilling on {req.prefill}" + (f" (before: {req.last_error})" if req.last_error else "")
        elif req.state is State.DECODING and req.decode:
            where = f"was decoding on {req.decode} after {len(req.tokens)} tokens"
        elif req.waiting_since_s is not None:
            return self.fail(request_id, Code.DEADLINE_EXCEEDED,
                             f"request {request_id!r} waited {now - req.waiting_since_s:.1f}s for a backend "
                             f"until its deadline: {req.wait_why}", now)
        else:
            where = f"was between backends ({req.last_error or 'no error'})"
        return self.fail(request_id, Code.DEADLINE_EXCEEDED,
                         f"request {request_id!r} reached its deadline: it {where}", now)

    def _abandon(self, req: Request) -> list[Effect]:
        """Tell the backends holding a request we give up (cancel, failure, replay) to let go."""
        effects: list[Effect] = []
        self._dequeue(req.request_id)
        if req.decode:
            effects.append(SendCancel(req.decode, req.request_id))
        elif req.state is State.PREFILLING and req.prefill:
            effects.append(SendCancel(req.prefill, req.request_id))   # drops it from its queue
        # Its staged KV, unless the group's first token showed a rank loaded it (and released
        # it). A rank still about to load it reads a reclaimed stage: the digest catches that.
        if req.staged is not None:
            effects.append(ReleaseStage(req.staged.source, req.request_id, req.staged.stage_id))
            req.staged = None
        return effects

    def _evict_oldest_terminal(self) -> None:
        done = [r for r in self.requests.values() if r.terminal and not r.streams]
        if done:
            del self.requests[min(done, key=lambda r: r.ended_s or 0.0).request_id]

    def attach(self, request_id: str) -> Request:
        req = self.get(request_id)
        req.streams += 1
        return req

    def detach(self, request_id: str, now: float) -> list[Effect]:
        """A client stream ended. The last one leaving a live request cancels it (client gone)."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        req.streams = max(0, req.streams - 1)
        effects: list[Effect] = []
        if req.streams == 0 and not req.terminal:
            effects = self.cancel(request_id, now)
        if req.streams == 0 and req.state in (State.CANCELLED, State.FAILED):
            self.requests.pop(request_id, None)  # nothing to resume from a dead run: free it now
        return effects

    def begin_prefill(self, request_id: str, prefill: str, now: float) -> None:
        req = self.get(request_id)
        self._fire(req, Event.PREFILL, now)
        req.prefill, req.decode = prefill, ""
        req.last_progress_s = req.prefill_sent_s = now
        req.waiting_since_s = None

    def retry_prefill(self, request_id: str, now: float) -> None:
        req = self.get(request_id)
        self._fire(req, Event.RETRY, now)
        req.prefill = ""

    def prefill_done(self, request_id: str, next_token: int, now: float) -> list[Effect]:
        """The prefill's sampled token is output position ``len(tokens)``. Finishes the
        request if it is a stop token or the last allowed one; else it goes on to decode."""
        req = self.get(request_id)
        if req.state is not State.PREFILLING:
            raise IllegalTransition(req.request_id, req.state, Event.FIRST_TOKEN)
        if not 0 <= next_token < self.cfg.vocab_size:
            return self.fail(request_id, Code.INTERNAL, f"{req.prefill} returned token id {next_token} outside the vocabulary", now)
        req.tokens.append(int(next_token))
        req.last_progress_s = now
        reason = self._finish_reason(req)
        if reason:
            req.finish_reason = reason
            self._fire(req, Event.FINISH, now)
        else:
            self._fire(req, Event.FIRST_TOKEN, now)
        return [Wake(request_id)]

    def assign_decode(self, request_id: str, decode: str, now: float) -> None:
        """Set before the Admit RPC goes out: the master may push tokens before its reply arrives."""
        req = self.get(request_id)
        if req.state is not State.DECODING:
            raise IllegalTransition(req.request_id, req.state, Event.TOKENS)
        req.decode = decode
        req.admitted_s = None
        req.last_progress_s = now
        req.waiting_since_s = None

    def unassign_decode(self, request_id: str) -> None:
        """The Admit failed: pushes from that group are strays from now on."""
        req = self.requests.get(request_id)
        if req is not None and req.state is State.DECODING:
            req.decode = ""

    def _finish_reason(self, req: Request) -> str:
        if req.tokens and req.tokens[-1] in req.params.stop_token_ids:
            return "stop"
        if len(req.tokens) >= req.params.max_tokens:
            return "length"
        return ""

    def on_tokens(self, request_id: str, index: int, token_ids: tuple[int, ...], finish_reason: str,
                  error: str, source: str, now: float, code: Code = Code.OK) -> list[Effect]:
        """A decode master's push (``code``: its ``Tokens.code``). Only the request's current
        decode group is listened to. A retryable error is replayed elsewhere, any other fails."""
        req = self.requests.get(request_id)
        if req is None or req.state is not State.DECODING or req.decode != source:
            self.stray_pushes += 1
            # A master still producing something nobody reads must stop.
            return [SendCancel(source, request_id)] if not finish_reason else []
        if error or finish_reason == "error":
            code = Code.INTERNAL if code is Code.OK else code   # an error without a code: the peer's bug
            msg = f"{source}: {error or 'decode failed'}"
            if retryable(code):   # the group lost it (a rank died): replay it elsewhere
                return self.restart(request_id, msg, now)
            return self.fail(request_id, code, msg, now)
        if any(not 0 <= t < self.cfg.vocab_size for t in token_ids):
            return [SendCancel(source, request_id),
                    *self.fail(request_id, Code.INTERNAL, f"{source} sent a token id outside the vocabulary", now)]
        have = len(req.tokens)
        if index > have:
            return [SendCancel(source, request_id),
                    *self.fail(request_id, Code.INTERNAL,
                               f"{source} skipped output positions: sent index {index}, expected {have}", now)]
        overlap = min(have - index, len(token_ids))
        if tuple(req.tokens[index:index + overlap]) != tuple(token_ids[:overlap]):
            return [SendCancel(source, request_id),
                    *self.fail(request_id, Code.INTERNAL,
                               f"{source} sent tokens that differ from those already streamed at index {index}", now)]
        effects: list[Effect] = []
        reason = ""
        for tok in token_ids[overlap:]:
            req.tokens.append(int(tok))
            reason = self._finish_reason(req)
            if reason:
                break
        req.staged = None   # the group produced a token: a rank loaded (and released) the staged KV
        if len(token_ids) > overlap:
            req.last_progress_s = now
            self._fire(req, Event.TOKENS, now)
            effects.append(Wake(request_id))
        if reason:
            if not finish_reason:
                effects.append(SendCancel(source, request_id))  # we stop here even if the master would not
            req.finish_reason = reason
            self._fire(req, Event.FINISH, now)
        elif finish_reason in ("stop", "length"):
            req.finish_reason = finish_reason
            self._fire(req, Event.FINISH, now)
        elif finish_reason == "cancelled":
            # We did not ask (that would have made the request terminal): the group is draining
            # or dropped it. Move it elsewhere.
            return effects + self.restart(request_id, f"{source} cancelled it", now)
        if req.terminal and Wake(request_id) not in effects:
            effects.append(Wake(request_id))
        return effects

    def backend_wait(self, request_id: str, why: str, now: float) -> float:
        """No backend to try now (``why`` says which and why): how long the driver may wait
        for one (for the next heartbeat, then it picks again). Raises ``RouterError`` when the
        request's wait is over: DEADLINE_EXCEEDED at the client's deadline (less the margin),
        UNAVAILABLE after ``backend_wait_s`` without one."""
        req = self.get(request_id)
        if req.waiting_since_s is None:
            req.waiting_since_s = now
        req.wait_why = why
        if req.deadline_s is not None:
            left = req.deadline_s - self.cfg.deadline_margin_s - now
            if left <= 0:
                raise RouterError(f"request {request_id!r} waited {now - req.waiting_since_s:.1f}s for a backend "
                                  f"until its deadline: {why}", Code.DEADLINE_EXCEEDED)
            return left
        left = req.waiting_since_s + self.cfg.backend_wait_s - now
        if left <= 0:
            raise NoBackend(f"request {request_id!r} waited {self.cfg.backend_wait_s:g}s for a backend: {why}")
        return left

    # ---------------------------------------------------------------- the retry driver

    @staticmethod
    def _new_phase(req: Request, kv: Any = None) -> None:
        req.kv, req.last_error, req.last_code = kv, "", None
        req.tried.clear()

    def next_call(self, request_id: str, now: float) -> Call | None:
        """The driver's next step: prefill it (``admitted``), admit it (prefilled, not yet
        admitted), wait for a backend, or None (nothing left to drive). Raises ``RouterError``
        when the request must fail: its wait for a backend is over, or every prefill failed
        on it with a code not worth waiting for."""
        req = self.get(request_id)
        if req.state is State.ADMITTED:
            try:
                name = self.pick_prefill(exclude=frozenset(req.tried))
            except NoBackend as exc:
                why = f"{exc.message}; last error: {req.last_error}" if req.last_error else exc.message
                if req.last_code is not None and not retryable(req.last_code):
                    raise RouterError(why, req.last_code) from None   # e.g. INTERNAL everywhere
                return self._wait(req, why, now)
            req.tried.add(name)
            self.begin_prefill(request_id, name, now)
            return CallPrefill(request_id, name)
        if req.state is State.DECODING and req.kv is not None and not req.decode:
            try:
                name = self.pick_decode(request_id, exclude=frozenset(req.tried))
            except NoBackend as exc:
                # The KV waits in the pool (pinned for this request: a lease, renewed by the
                # replay if it runs out) while no decode group can take it.
                return self._wait(req, f"{exc.message}; last error: {req.last_error}" if req.last_error
                                  else exc.message, now)
            req.tried.add(name)
            self.assign_decode(request_id, name, now)
            return CallAdmit(request_id, name, req.kv)
        return None

    def _wait(self, req: Request, why: str, now: float) -> WaitBackend:
        left = self.backend_wait(req.request_id, why, now)
        req.tried.clear()
        return WaitBackend(req.request_id, left, why)

    def prefill_answered(self, request_id: str, next_token: int, kv: Any, now: float) -> list[Effect]:
        """The Prefill's answer: the first token; on to the admission (unless it finished)."""
        effects = self.prefill_done(request_id, next_token, now)
        req = self.requests.get(request_id)
        if req is not None and not req.terminal:
            self._new_phase(req, kv)
            req.staged = kv if getattr(kv, "source", "") else None
        elif getattr(kv, "source", ""):   # it ended at its first token: nobody will load the staged KV
            effects.append(ReleaseStage(kv.source, request_id, kv.stage_id))
        return effects

    def admit_answered(self, request_id: str, now: float) -> None:
        """The DP group took it: its tokens come as pushes from now on."""
        req = self.requests.get(request_id)
        if req is not None:
            req.kv = None
            req.admitted_s = now
            self.dispatch_due = True

    def call_failed(self, request_id: str, call: CallPrefill | CallAdmit, code: Code, message: str,
                    now: float, *, answered: bool = True) -> list[Effect]:
        """``call`` was refused with ``code`` (``answered``), or not answered in time. Worth
        another try: the driver's next call picks another backend; else ``RouterError``."""
        req = self.get(request_id)
        if answered and not retry_elsewhere(code):
            raise RouterError(f"{call.service}: {message}", code)
        req.last_error = f"{call.service}: {code}: {message}" if answered else f"{call.service} {message}"
        effects: list[Effect] = []
        if isinstance(call, CallPrefill):
            req.last_code = code
            self.retry_prefill(request_id, now)
        else:
            if not answered:
                effects.append(SendCancel(call.service, request_id))  # it may have admitted it after all
            self.unassign_decode(request_id)
        return effects

    def cancel(self, request_id: str, now: float) -> list[Effect]:
        """Client cancel. Unknown id -> UnknownRequest; a terminal request is left as it is."""
        req = self.get(request_id)
        if req.terminal:
            return []
        effects = self._abandon(req)
        req.finish_reason = "cancelled"
        self._fire(req, Event.CANCEL, now)
        if req.streams == 0:
            self.requests.pop(request_id, None)
        return [*effects, Wake(request_id)]

    def fail(self, request_id: str, code: Code, message: str, now: float) -> list[Effect]:
        req = self.requests.get(request_id)
        if req is None or req.terminal:
            return []
        effects = self._abandon(req)
        req.error_code, req.error = code, message
        self._fire(req, Event.FAIL, now)
        if req.streams == 0:
            self.requests.pop(request_id, None)
        return [*effects, Wake(request_id)]

    def restart(self, request_id: str, reason: str, now: float) -> list[Effect]:
        """Send a live request back to be replayed elsewhere, at most ``max_restarts`` times."""
        req = self.requests.get(request_id)
        if req is None or req.terminal or req.state is State.ADMITTED:
            return []
        if req.restarts >= self.cfg.max_restarts:
            return self.fail(request_id, Code.UNAVAILABLE,
                             f"gave up after {req.restarts} restarts; last: {reason}", now)
        effects = [e for e in self._abandon(req)
                   if self.peers.get(getattr(e, "service", ""), Peer("")).liveness is not Liveness.DEAD]
        self._fire(req, Event.RESTART, now)
        req.restarts += 1
        req.prefill, req.decode = "", ""
        self._new_phase(req)
        req.last_progress_s = now
        self.replays[request_id] = None
        self.dispatch_due = True
        return [*effects, Restart(request_id, reason), Wake(request_id)]

    def tick(self, now: float) -> list[Effect]:
        """Forget finished requests nobody reads after the retention time; replay requests
        whose decode group went silent without being declared dead (it lost them)."""
        effects: list[Effect] = []
        for name, peer in self.peers.items():
            if peer.woke and peer.liveness is Liveness.ALIVE and now - peer.last_beat_s >= self.cfg.dead_after_s:
                effects += self.liveness_changed(name, Liveness.DEAD, now)   # hung again
        for rid, req in list(self.requests.items()):
            if req.terminal:
                if not req.streams and now - (req.ended_s or now) >= self.cfg.retain_finished_s:
                    del self.requests[rid]
            elif req.deadline_s is not None and now >= req.deadline_s - self.cfg.deadline_margin_s:
                effects += self.expire(rid, now)   # a backstop: the client's stream expires it on time
            elif req.state is State.DECODING and req.decode and \
                    now - req.last_progress_s >= self.cfg.token_timeout_s:
                effects += self.restart(rid, f"no token from {req.decode} for {self.cfg.token_timeout_s:g}s", now)
        return effects

    # ---------------------------------------------------------------- peers (heartbeats only)

    def observe_beat(self, service: str, role: str, group: int, epoch: str, status: str,
                     load: dict[str, float], now: float) -> list[Effect]:
        peer = self.peers.get(service)
        effects: list[Effect] = []
        if peer is None:
            peer = self.peers[service] = Peer(role, group, epoch)
            if role == "decode":
                effects.append(Subscribe(service))
        elif peer.epoch != epoch:
            # Restarted (new epoch), perhaps faster than the detector could call it dead: whatever
            # it held is gone.
            peer.epoch = epoch
            peer.woke = False
            effects += self._backend_lost(service, f"{service} restarted", now)
            if role == "decode":
                effects.append(Subscribe(service))
        elif peer.liveness is Liveness.DEAD and role == "prefill":
            peer.liveness, peer.woke = Liveness.ALIVE, True   # it was hung and is back (see the rules)
            self.revived += 1
        peer.status, peer.load, peer.group = status, dict(load), group
        peer.last_beat_s = now
        self.dispatch_due = True
        return effects

    def liveness_changed(self, service: str, new: Liveness, now: float) -> list[Effect]:
        peer = self.peers.get(service)
        if peer is None:
            return []  # we learn role and load from its first beat
        if new is Liveness.ALIVE:
            peer.woke = False   # the detector speaks for it again (a new epoch)
        peer.liveness = new
        self.dispatch_due = True
        return self._backend_lost(service, f"{service} is dead", now) if new is Liveness.DEAD else []

    def _backend_lost(self, service: str, reason: str, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for rid, req in list(self.requests.items()):
            if not req.terminal and service in (req.prefill if req.state is State.PREFILLING else "", req.decode):
                effects += self.restart(rid, reason, now)
        return effects

    # ---------------------------------------------------------------- policy

    def _in_flight(self, service: str) -> int:
        return sum(1 for r in self.requests.values()
                   if not r.terminal and service in (r.prefill if r.state is State.PREFILLING else "", r.decode))

    def pick_prefill(self, *, exclude: frozenset[str] = frozenset()) -> str:
        """Alive, serving, lowest load (running + queued from its beats, plus what this router
        sent since: beats lag by up to one interval, and a burst must still spread)."""
        cands = [(p.load.get("running", 0.0) + p.load.get("queued", 0.0) + self._in_flight(name), name)
                 for name, p in self.peers.items() if p.role == "prefill" and p.usable and name not in exclude]
        if not cands:
            raise NoBackend(self._none_alive("prefill", exclude))
        return min(cands)[1]

    def pick_decode(self, request_id: str, *, exclude: frozenset[str] = frozenset()) -> str:
        """Alive, serving DP group; prefer running < max_batch and room for the request's KV,
        then most free KV blocks. When every group is full the least queued one takes it (the
        master queues: back-pressure stays there instead of refusing the client)."""
        need = self.get(request_id).kv_blocks_needed(self.cfg.kv_block_size)
        cands = []
        for name, p in self.peers.items():
            if p.role != "decode" or not p.usable or name in exclude:
                continue
            running = p.load.get("running", 0.0) + self._in_flight(name)
            free = p.load.get("free_kv_blocks", 0.0)
            has_room = running < self.cfg.max_batch and free >= need
            cands.append((not has_room, -free if has_room else p.load.get("queued", 0.0), running, name))
        if not cands:
            raise NoBackend(self._none_alive("decode", exclude))
        return min(cands)[-1]

    def _none_alive(self, role: str, exclude: frozenset[str]) -> str:
        known = {n: p for n, p in self.peers.items() if p.role == role}
        if not known:
            return f"no {role} service has been heard from (no heartbeat yet)"

        def why(n: str, p: Peer) -> str:
            return "tried" if n in exclude else p.liveness.value if p.liveness is not Liveness.ALIVE else p.status

        states = ", ".join(f"{n}: {why(n, p)}" for n, p in sorted(known.items()))
        return f"no live {role} service ({states})"

    def load(self) -> dict[str, Any]:
        live = sum(1 for r in self.requests.values() if not r.terminal)
        queued = len(self.waiting) + len(self.replays)
        return {"running": live - queued, "queued": queued, "table": len(self.requests), "expired": self.expired,
                "max_waiting": self.cfg.max_waiting}
