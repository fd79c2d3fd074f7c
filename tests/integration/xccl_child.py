"""A child process owning one XCCL endpoint, for the multi-process p2p tests.

    python -m tests.integration.xccl_child KIND NAMESPACE NAME [PEER=ADDRESS ...]

Echoes every message back to its sender, except ``[b"WINDOW", offset, length]`` (decimal
ASCII), answered with those bytes of its own ``kv`` window: what a peer's put really wrote here. Prints ``READY <address>`` once the endpoint is
registered (the test waits for that line, never on a sleep). SIGTERM closes the endpoint
(unlinking its segment) and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from xccl_net.endpoint import EndpointConfig, open_endpoint
from xccl_net.errors import XcclError, XcclTimeout


async def main(kind: str, namespace: str, name: str, peers: list[str]) -> int:
    directory = dict(p.split("=", 1) for p in peers)
    cfg = EndpointConfig(name=name, namespace=namespace, kind=kind, npu=1, ring_slots=8, slot_bytes=64 * 1024,
                         windows={"kv": 1 << 20}, directory=directory)
    ep = await open_endpoint(cfg)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", getattr(ep, "address", ""), flush=True)

    async def echo() -> None:
        while True:
            try:
                src, frames = await ep.recv(timeout_s=1.0)
                if len(frames) == 3 and bytes(frames[0]) == b"WINDOW":
                    off, n = int(bytes(frames[1])), int(bytes(frames[2]))
                    frames = [ep.window("kv")[off:off + n].tobytes()]
                await ep.send(src, frames, timeout_s=5.0)
            except XcclTimeout:
                continue
            except XcclError as exc:  # a bad peer must not take the child down
                print("ERROR", type(exc).__name__, exc, file=sys.stderr, flush=True)

    try:
        async with asyncio.TaskGroup() as tg:
            server = tg.create_task(echo())
            await stop.wait()
            server.cancel()
    finally:
        await ep.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])))
