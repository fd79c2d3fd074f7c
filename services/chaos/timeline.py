"""Pure judging: from what happened (stream arrivals, fault records, liveness changes) to the
numbers, the recovery of each fault and the verdict. No clocks: every time is seconds since the
load started, measured by the runner.

Recovery of a fault, precisely (``recovery``):

- ``progress_s``: from the injection until every stream that was in flight at the injection
  makes progress again. A stream's recovery point is the later of its first token after the
  injection and the end of every *stall* -- a gap between two consecutive tokens longer than
  the scenario's ``stall_s`` -- that began before the fault ended (its revert; for a process
  fault, the service being back; else the injection). So a step already in flight that
  delivers one more token does not hide the stall that follows it. A stream that failed
  without recovering never recovers (None). No stream in flight: 0.
- ``back_s`` (process faults): from the injection until the routers' view (heartbeats through
  the pod's own failure detector) shows the service alive again: in a new epoch for
  kill / stop / restart; for a hang, alive at or after the SIGCONT (a hang longer than the
  dead-after window ends the stale incarnation, so that is a new epoch too). The fabric
  simulator has no heartbeat: its lane is its health check (SERVING = alive).
- ``recovery_s`` = the larger of the two (None if either never happened).

The degraded window of a fault is [injection, max(injection + recovery_s, revert)], at least
one second long; its throughput is the tokens that arrived inside it divided by its length.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.chaos.scenario import Checks

BIN_S = 0.5
MIN_WINDOW_S = 1.0


@dataclass(slots=True)
class StreamRecord:
    index: int
    request_id: str
    t_start: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)   # (t, tokens in this delta)
    tokens: list[int] = field(default_factory=list)
    finish: str = ""
    error_code: str = ""
    error: str = ""
    t_end: float | None = None

    @property
    def t_first(self) -> float | None:
        return self.arrivals[0][0] if self.arrivals else None


@dataclass(slots=True)
class FaultRecord:
    index: int
    label: str
    kind: str
    services: tuple[str, ...] = ()
    t_inject: float | None = None       # when the fault was applied (before its verification)
    t_revert: float | None = None       # continued / link back up / partition healed
    evidence: list[str] = field(default_factory=list)
    error: str = ""                     # not injected or not verified: fails the experiment
    old_epochs: dict[str, str] = field(default_factory=dict)   # routers' view at injection


@dataclass(frozen=True, slots=True)
class LivenessEvent:
    t: float
    service: str
    state: str            # alive | suspect | dead
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Recovery:
    progress_s: float | None
    back_s: float | None            # None where it does not apply (fabric faults) or never happened
    recovery_s: float | None
    back_applies: bool

    def to_json(self) -> dict:
        r = lambda v: None if v is None else round(v, 3)  # noqa: E731
        return {"progress_s": r(self.progress_s), "back_s": r(self.back_s) if self.back_applies else "n/a",
                "recovery_s": r(self.recovery_s)}


def progress_s(streams: Sequence[StreamRecord], t: float, t_fault_end: float, stall_s: float,
               now: float) -> float | None:
    """See the module docstring; None while that cannot be told yet at ``now`` (a stall may
    still be open), or never (a stream failed stalled)."""
    if now < t_fault_end + stall_s:
        return None
    worst = 0.0
    for s in streams:
        if s.t_start > t or (s.t_end is not None and s.t_end <= t):
            continue
        times = [a for a, _ in s.arrivals]
        if s.finish and s.t_end is not None:
            times.append(s.t_end)
        before = [a for a in times if a <= t]
        after = [a for a in times if a > t]
        ended = s.t_end is not None
        last = after[-1] if after else (before[-1] if before else s.t_start)
        if not ended and now - last > stall_s and last < t_fault_end:
            return None                      # stalled right now
        if not after:
            return None                      # no token since the fault (yet, or ever: it failed)
        point = after[0]
        seq = ([before[-1]] if before else [s.t_start]) + after
        for a, b in zip(seq, seq[1:]):
            if b - a > stall_s and a < t_fault_end:
                point = max(point, b)
        if ended and not s.finish and seq[-1] < t_fault_end:
            return None                      # failed inside the fault
        worst = max(worst, point - t)
    return worst


def back_s(events: Sequence[LivenessEvent], service: str, kind: str, t_inject: float, old_epoch: str,
           t_revert: float | None) -> float | None:
    mine = [e for e in events if e.service == service]
    if kind == "hang":   # alive at the SIGCONT (it never left), or the first alive view after it
        if t_revert is None:
            return None
        before = [e for e in mine if e.t <= t_revert]
        if before and before[-1].state == "alive":
            return t_revert - t_inject
        after = next((e for e in mine if e.t > t_revert and e.state == "alive"), None)
        return None if after is None else after.t - t_inject
    if service == "fabric":   # no epochs: alive again after having been seen down
        down = next((e for e in mine if e.t >= t_inject and e.state != "alive"), None)
        if down is None:
            return None
        up = next((e for e in mine if e.t > down.t and e.state == "alive"), None)
        return None if up is None else up.t - t_inject
    up = next((e for e in mine if e.t >= t_inject and e.state == "alive" and e.epoch != old_epoch), None)
    return None if up is None else up.t - t_inject


def recovery(rec: FaultRecord, streams: Sequence[StreamRecord], events: Sequence[LivenessEvent], *,
             stall_s: float, now: float) -> Recovery:
    if rec.t_inject is None or rec.error:
        return Recovery(None, None, None, False)
    applies = rec.kind in ("kill", "hang", "stop", "restart")
    back = None
    if applies:
        backs = [back_s(events, s, rec.kind, rec.t_inject, rec.old_epochs.get(s, ""), rec.t_revert)
                 for s in rec.services]
        back = None if any(b is None for b in backs) else max(backs, default=0.0)
    fault_end = rec.t_revert if rec.t_revert is not None else rec.t_inject + (back or 0.0)
    prog = progress_s(streams, rec.t_inject, fault_end, stall_s, now)
    total = None if prog is None or (applies and back is None) else max(prog, back or 0.0)
    return Recovery(prog, back, total, applies)


def tokens_between(streams: Sequence[StreamRecord], t0: float, t1: float) -> int:
    return sum(n for s in streams for t, n in s.arrivals if t0 <= t < t1)


def degraded_window(rec: FaultRecord, rcv: Recovery, t_end: float) -> tuple[float, float] | None:
    if rec.t_inject is None:
        return None
    end = rec.t_inject + (rcv.recovery_s if rcv.recovery_s is not None else t_end - rec.t_inject)
    if rec.t_revert is not None:
        end = max(end, rec.t_revert)
    return rec.t_inject, max(end, rec.t_inject + MIN_WINDOW_S)


def throughput_series(streams: Sequence[StreamRecord], t_end: float, bin_s: float = BIN_S) -> list[tuple[float, float]]:
    n = max(1, int(t_end / bin_s) + 1)
    bins = [0] * n
    for s in streams:
        for t, k in s.arrivals:
            bins[min(n - 1, max(0, int(t / bin_s)))] += k
    return [(round(i * bin_s, 3), b / bin_s) for i, b in enumerate(bins)]


def ttft_series(streams: Sequence[StreamRecord]) -> list[tuple[float, float]]:
    return sorted((round(s.t_start, 3), round(s.t_first - s.t_start, 4)) for s in streams if s.t_first is not None)


def lanes(events: Sequence[LivenessEvent], services: Sequence[str], t_end: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per service: (start, end, state) spans; 'unknown' before its first beat was heard."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    for name in services:
        spans, t, state = [], 0.0, "unknown"
        for e in (e for e in events if e.service == name):
            t_e = max(0.0, e.t)
            if e.state != state:
                if t_e > t:
                    spans.append((round(t, 3), round(t_e, 3), state))
                t, state = max(t, t_e), e.state
        if t_end > t:
            spans.append((round(t, 3), round(t_end, 3), state))
        out[name] = spans
    return out


def exactness(streams: Sequence[StreamRecord], expected: Sequence[Sequence[int]]) -> dict:
    """Finished streams must equal the reference; failed ones must hold a prefix of it."""
    wrong = []
    for s in streams:
        ref = list(expected[s.index % len(expected)])   # an extended open load repeats the workload
        got = s.tokens
        if (s.finish and got != ref) or (not s.finish and got != ref[:len(got)]):
            wrong.append(s.index)
    return {"checked": len(streams), "exact": len(streams) - len(wrong), "mismatched": wrong}


def errors_by_code(streams: Sequence[StreamRecord]) -> dict[str, int]:
    return dict(Counter(s.error_code for s in streams if s.error_code))


def verdict(checks: Checks, faults: Sequence[FaultRecord], recoveries: Sequence[Recovery],
            degraded_tps: Sequence[float | None], errors: dict[str, int], exact: dict) -> list[str]:
    """The failed checks, each a sentence; empty means PASS."""
    failed = [f"fault {f.label}: {f.error}" for f in faults if f.error]
    n_err = sum(errors.values())
    if n_err > checks.max_errors:
        failed.append(f"errors: {n_err} > max_errors {checks.max_errors} ({errors})")
    if checks.exact and exact["mismatched"]:
        failed.append(f"exactness: streams {exact['mismatched']} differ from the reference engine")
    for f, r, tps in zip(faults, recoveries, degraded_tps):
        if f.error:
            continue
        if checks.max_recovery_s is not None:
            if r.recovery_s is None:
                failed.append(f"recovery: fault {f.label} never recovered")
            elif r.recovery_s > checks.max_recovery_s:
                failed.append(f"recovery: fault {f.label} took {r.recovery_s:.2f}s > max_recovery_s "
                              f"{checks.max_recovery_s:g}")
        if checks.min_degraded_tokens_per_s is not None and tps is not None and tps < checks.min_degraded_tokens_per_s:
            failed.append(f"throughput: {tps:.1f} tokens/s while {f.label} was active/recovering < "
                          f"min_degraded_tokens_per_s {checks.min_degraded_tokens_per_s:g}")
    return failed
