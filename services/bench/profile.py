"""Decode-step profile of a running pod, from the counters its services publish in heartbeats.

Snapshot before and after a load run; the difference, divided by the steps taken, says where a
decode step's time went: at the master (scheduling, the round trip to the attention ranks,
sampling + streaming), at the attention ranks (local numpy compute, A2E dispatch, waiting for
the experts' E2A answers) and at the experts (FFN compute).
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.heartbeat import HeartbeatSubscriber
from services.pod.spec import PodSpec, address, services

ROLES = ("decode", "attention", "expert")


class ProfileProbe:
    def __init__(self, spec: PodSpec) -> None:
        self.names = [s.name for s in services(spec) if s.role in ROLES]
        self.sub = HeartbeatSubscriber([address(spec, n, "heartbeat") for n in self.names])
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> ProfileProbe:
        self._task = asyncio.create_task(self.sub.run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def snapshot(self, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
        """The load of every service from a beat published after this call."""
        seqs = {n: (self.sub.latest[n].seq if n in self.sub.latest else -1) for n in self.names}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fresh = {n: b for n, b in self.sub.latest.items() if n in seqs and b.seq > seqs[n] + 1}
            if len(fresh) == len(self.names):
                return {n: dict(b.load) for n, b in fresh.items()}
            if loop.time() > deadline:
                missing = sorted(set(self.names) - set(fresh))
                raise TimeoutError(f"no fresh heartbeat from {missing}")
            await asyncio.sleep(0.05)  # no event fires per beat here; bounded by the deadline


def step_profile(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    def delta(role_prefix: str, key: str) -> float:
        return sum(after[n].get(key, 0.0) - before[n].get(key, 0.0) for n in after if n.startswith(role_prefix))

    master_steps = delta("decode-", "prof_steps")
    rank_steps = delta("attention-", "prof_steps")
    if not master_steps or not rank_steps:
        return {"steps": 0}
    per = lambda prefix, key, n: delta(prefix, key) / n  # noqa: E731
    out = {
        "master_steps": master_steps, "attention_steps": rank_steps,
        "master_ms_per_step": {
            "schedule": per("decode-", "prof_schedule_ms", master_steps),
            "attention_round_trip": per("decode-", "prof_rank_rtt_ms", master_steps),
            "sample_and_stream": per("decode-", "prof_sample_stream_ms", master_steps),
        },
        "attention_ms_per_step": {
            "local_compute": per("attention-", "prof_local_ms", rank_steps),
            "a2e_dispatch": per("attention-", "prof_dispatch_ms", rank_steps),
            "wait_for_experts": per("attention-", "prof_wait_ms", rank_steps),
        },
        "expert_compute_ms_per_attention_step": per("expert-", "compute_ms", rank_steps),
    }
    moe_layers = delta("attention-", "prof_moe_layers")
    if moe_layers:   # the yardstick: A2E dispatch of one MoE layer of one rank
        out["a2e_dispatch_ms_per_moe_layer"] = per("attention-", "prof_dispatch_ms", moe_layers)
        # The same in the rank's CPU time: on a busy host the wall time above also counts the
        # moments the rank is preempted by the experts its doorbells just woke.
        out["a2e_dispatch_cpu_ms_per_moe_layer"] = per("attention-", "prof_dispatch_cpu_ms", moe_layers)
    events = delta("expert-", "events_served")
    if events:   # how often an expert found several blocks waiting, and blocks of one layer among them
        out["expert_blocks"] = {"served": events, "batched_fraction": delta("expert-", "batched_blocks") / events,
                                "merged_fraction": delta("expert-", "merged_blocks") / events}
    a = out["attention_ms_per_step"]
    attention_total = a["local_compute"] + a["a2e_dispatch"] + a["wait_for_experts"]
    out["derived_ms_per_step"] = {
        "attention_step": attention_total,
        # The master's round trip minus the rank's own step: Run/Logits over XCCL + wake-ups.
        "run_logits_transport": out["master_ms_per_step"]["attention_round_trip"] - attention_total,
        # Waiting on experts minus their compute: A2E/E2A transfers, doorbells, expert queueing.
        "moe_transport_and_queueing": a["wait_for_experts"] - out["expert_compute_ms_per_attention_step"],
    }
    return out
