"""The attention rank's view of expert instance liveness, from their heartbeats.

Subscribes to every expert instance's heartbeat and feeds the dispatcher's rank health
(``xccl_net.dispatch_health``): the failure detector's "dead" takes an instance out (XCCL
errors and missing answers take it out sooner, inside the dispatcher), and any beat published
after its failure brings it back — a restart (new epoch) or a continued SIGSTOP (same epoch,
newer sequence number; the detector itself ignores those beats, dead being final per epoch,
but an expert is stateless, so a continued one is as good as new).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.heartbeat import Beat, HeartbeatSubscriber
from services.common.liveness import Change, DetectorConfig, FailureDetector, Liveness
from services.pod.spec import PodSpec, address
from xccl_net.dispatch import A2EDispatcher


class ExpertWatch:
    def __init__(self, spec: PodSpec, dispatcher: A2EDispatcher, experts: Sequence[str]) -> None:
        self.dispatcher = dispatcher
        self.rank_of = {name: r for r, name in enumerate(experts)}
        self.dead_after_s = spec.heartbeat.dead_after_s
        self.sub = HeartbeatSubscriber(
            [address(spec, name, "heartbeat") for name in experts], on_change=self._on_change, on_beat=self._on_beat,
            detector=FailureDetector(DetectorConfig(spec.heartbeat.suspect_after_s, spec.heartbeat.dead_after_s)))

    def _on_beat(self, beat: Beat) -> None:
        rank = self.rank_of.get(beat.service)
        if rank is not None:
            self.dispatcher.beat(rank, beat.epoch, beat.seq)

    def _on_change(self, change: Change) -> None:
        rank = self.rank_of.get(change.peer)
        if rank is not None and change.new is Liveness.DEAD:
            self.dispatcher.silent(rank, f"no heartbeat for {self.dead_after_s:g} s")

    async def run(self) -> None:
        await self.sub.run()
