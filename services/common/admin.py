"""Operator admin calls on a service's RPC plane: stragglers (a chaos tool's "slow one service").

``SetStraggler(delay_ms)`` makes one service slow by ``delay_ms`` per unit of its work: an
expert instance per dispatched block it answers (every A2E block, empty ones too), an
attention rank per decode step. ``GetStraggler()`` reads the setting back with how many units
were delayed so far, so a tool can verify the fault took effect (the count grows). 0 ends it.
Services that cannot straggle refuse with INVALID_ARGUMENT naming the message; a bad delay is
INVALID_ARGUMENT naming the field. The service stays up either way.

Client side: ``set_straggler(pod, service, delay_ms)`` / ``get_straggler(pod, service)``, where
``pod`` is a ``PodSpec``, the ready JSON ``xds up --ready-file`` wrote (dict or path), or the
pod's ``pod.yaml``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.status import Code, Refused
from services.common.wire import message

MAX_DELAY_MS = 10_000.0


@message("admin.SetStraggler")
@dataclass(frozen=True, slots=True)
class SetStraggler:
    delay_ms: float


@message("admin.GetStraggler")
@dataclass(frozen=True, slots=True)
class GetStraggler:
    pass


@message("admin.Straggler")
@dataclass(frozen=True, slots=True)
class Straggler:
    service: str
    delay_ms: float      # in force now
    unit: str            # "block" (expert instance) or "step" (attention rank)
    delayed: int         # units delayed since the service started (any delay)


class StragglerKnob:
    """The server side: ``handle(msg)`` answers the admin messages, None for any other."""

    def __init__(self, service: str, unit: str, apply: Callable[[float], None], delayed: Callable[[], int]) -> None:
        self.service, self.unit, self._apply, self._delayed = service, unit, apply, delayed
        self.delay_ms = 0.0

    def handle(self, msg: object) -> Straggler | None:
        if isinstance(msg, SetStraggler):
            d = msg.delay_ms
            if not (math.isfinite(d) and 0.0 <= d <= MAX_DELAY_MS):
                raise Refused(Code.INVALID_ARGUMENT, f"SetStraggler.delay_ms must be in 0..{MAX_DELAY_MS:g}, got {d!r}")
            self.delay_ms = float(d)
            self._apply(self.delay_ms / 1e3)
        elif not isinstance(msg, GetStraggler):
            return None
        return Straggler(self.service, self.delay_ms, self.unit, self._delayed())


def pod_spec(pod: Any):
    """A ``PodSpec`` from a spec, a ready dict, or a path to a ready JSON / pod.yaml."""
    from services.pod.spec import PodSpec, load_pod

    if isinstance(pod, PodSpec):
        return pod
    if isinstance(pod, (str, Path)):
        p = Path(pod)
        if p.suffix in (".yaml", ".yml"):
            return load_pod(p)
        pod = json.loads(p.read_text())
    if isinstance(pod, dict) and "run_dir" in pod:
        return load_pod(Path(pod["run_dir"]) / "pod.yaml")
    raise TypeError(f"expected a PodSpec, a ready JSON (dict or path) or a pod.yaml, got {type(pod).__name__}")


async def _call(pod: Any, service: str, msg: object, timeout_s: float, at: str | None = None) -> Straggler:
    from services.common.rpc import RpcClient
    from services.pod.spec import address

    client = RpcClient(at or address(pod_spec(pod), service, "rpc"))
    try:
        reply = await client.call(msg, timeout_s=timeout_s)
    finally:
        await client.close()
    if not isinstance(reply, Straggler):
        raise Refused(Code.INTERNAL, f"{service} answered {type(msg).__name__} with {type(reply).__name__}")
    return reply


async def set_straggler(pod: Any, service: str, delay_ms: float, *, timeout_s: float = 5.0,
                        address: str | None = None) -> Straggler:
    """Slow ``service`` by ``delay_ms`` per block/step (0 ends it); returns the state read back.
    ``address``: the service's RPC endpoint as reached from here, when not the pod's own rule
    (a Compose pod seen from the host)."""
    return await _call(pod, service, SetStraggler(float(delay_ms)), timeout_s, address)


async def get_straggler(pod: Any, service: str, *, timeout_s: float = 5.0, address: str | None = None) -> Straggler:
    return await _call(pod, service, GetStraggler(), timeout_s, address)
