"""Peer processes of `xds bench xccl`: echo/sink servers and the fabric simulator.

Run as ``python -m services.bench.xccl_peers ROLE ...``; a peer prints one ``READY <info>``
line on stdout when it can serve, and exits on SIGTERM (the handler only sets an event).
The bench side starts them with ``peer_process``/``fabric_process`` and stops them by PID:
SIGTERM, then SIGKILL after a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

KIB, MIB = 1 << 10, 1 << 20
READY_TIMEOUT_S = 20.0
STOP_GRACE_S = 3.0
P2P_SLOT_BYTES = MIB
P2P_RING_SLOTS = 32
ECHO, SINK, STAMP, INTO = b"E", b"S", b"T", b"I"
GRPC_METHOD = "/xds.bench.Sink/Push"
GRPC_MAX = 128 * MIB
# Children log warnings only: stderr of the bench stays readable.
_CHILD_ENV = {**os.environ, "XDS_LOG_LEVEL": os.environ.get("XDS_LOG_LEVEL", "warning")}


# ---------------------------------------------------------------- process management


@contextlib.contextmanager
def peer_process(role: str, *args: str) -> Iterator[str]:
    """Start a peer, wait for its READY line, yield its info; stop it by PID on exit."""
    cmd = [sys.executable, "-m", "services.bench.xccl_peers", role, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=_CHILD_ENV)
    try:
        yield _await_ready(proc, role)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def fabric_process(config_path: str, ready_file: str) -> Iterator[str]:
    """A real `python -m fabric_sim` process; yields its data-plane address."""
    cmd = [sys.executable, "-m", "fabric_sim", "--config", config_path, "--ready-file", ready_file]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=_CHILD_ENV)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        # The sim announces readiness only by an atomically written file: poll it with a deadline.
        while not os.path.exists(ready_file):
            if proc.poll() is not None:
                raise RuntimeError(f"fabric-sim exited with {proc.returncode} before ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fabric-sim not ready within {READY_TIMEOUT_S} s")
            time.sleep(0.01)
        with open(ready_file) as f:
            yield json.load(f)["data_address"]
    finally:
        stop_process(proc)


def _await_ready(proc: subprocess.Popen, role: str) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"peer {role} not ready within {READY_TIMEOUT_S} s")
            if sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"peer {role} exited with {proc.wait()} before READY")
                if line.startswith("READY"):
                    return line[len("READY"):].strip()
    finally:
        sel.close()


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_GRACE_S)
    if proc.stdout is not None:
        proc.stdout.close()


def _announce(info: str) -> None:
    sys.stdout.write(f"READY {info}\n")
    sys.stdout.flush()


async def _until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def _serve_until_terminated(serve: Any) -> None:
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(serve())
        await _until_terminated()
        task.cancel()


# ---------------------------------------------------------------- peers


async def _zmq_echo_peer(address: str) -> None:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(address)
    _announce(address)

    async def echo() -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            await sock.send_multipart(frames, copy=False)

    try:
        await _serve_until_terminated(echo)
    finally:
        sock.close(linger=0)
        ctx.term()


async def _grpc_sink_peer() -> None:
    import grpc
    from google.protobuf import wrappers_pb2

    async def push(request_iterator: Any, context: Any) -> wrappers_pb2.UInt64Value:
        total = 0
        async for msg in request_iterator:
            total += len(msg.value)
        return wrappers_pb2.UInt64Value(value=total)

    handler = grpc.method_handlers_generic_handler("xds.bench.Sink", {
        "Push": grpc.stream_unary_rpc_method_handler(
            push, request_deserializer=wrappers_pb2.BytesValue.FromString,
            response_serializer=wrappers_pb2.UInt64Value.SerializeToString)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", GRPC_MAX),
                                      ("grpc.max_send_message_length", GRPC_MAX)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _announce(str(port))
    try:
        await _until_terminated()
    finally:
        await server.stop(0.5)


# The echo peer's registered window: the target of one-sided put bandwidth runs.
BULK_WINDOW_BYTES = 64 << 20
# The echo peer's receive buffer in INTO mode: the largest bandwidth message plus its frame table.
INTO_BUFFER_BYTES = (64 << 20) + 4096


def endpoint_config(kind: str, name: str, namespace: str, npu: int, run_dir: str, *,
                    slot_bytes: int, ring_slots: int, windows: dict[str, int] | None = None,
                    directory: dict[str, str] | None = None) -> Any:
    from xccl_net.endpoint import EndpointConfig

    return EndpointConfig(name=name, namespace=namespace, kind=kind, npu=npu, ring_slots=ring_slots,
                          slot_bytes=slot_bytes, windows=windows or {},
                          directory=directory or {})


async def _xccl_echo_peer(kind: str, namespace: str, run_dir: str, *, fabric_address: str | None = None,
                          directory: dict[str, str] | None = None) -> None:
    """ECHO: send the frames back; SINK: swallow (bandwidth runs); STAMP: reply with the
    ``time.monotonic()`` at which the message became visible here (fidelity runs).
    ``[INTO, b"1"]``: from now on receive that sender's messages with ``recv_into`` into one
    pre-touched reused private buffer (posted before the reply, so the next message goes
    straight in); ``[INTO, b"w"]``: the same into a buffer in our registered window "into"
    (shm: the sender writes the message straight into it); ``[INTO, b"0"]``: back to ``recv``;
    each is answered ``[INTO, json of our stats]``."""
    from xccl_net.endpoint import open_endpoint
    from xccl_net.errors import PeerUnreachable, XcclTimeout

    fabric = None
    if fabric_address is not None:
        from xccl_net.fabric_client import FabricClient
        fabric = await FabricClient.connect(fabric_address, name="echo", npu=1, timeout_s=5.0)
    cfg = endpoint_config(kind, "echo", namespace, 1, run_dir, slot_bytes=P2P_SLOT_BYTES,
                          ring_slots=P2P_RING_SLOTS, directory=directory,
                          windows={"bulk": BULK_WINDOW_BYTES, "into": INTO_BUFFER_BYTES})
    ep = await open_endpoint(cfg, fabric=fabric)
    _announce(getattr(ep, "address", "") or "echo")

    private_buf = np.empty(INTO_BUFFER_BYTES, dtype=np.uint8)
    private_buf[:] = 0  # pre-touched: the caller's buffer of a real receiver is warm and reused

    async def serve() -> None:
        into_src: str | None = None
        into_buf = private_buf
        posted = None  # the receive posted for into_src ahead of its next message
        while True:
            try:
                if into_src is not None:
                    if posted is None:
                        posted = ep.post_recv(into_src, into_buf)
                    src, frames, _ = await posted.wait(timeout_s=3600.0)
                else:
                    src, frames = await ep.recv(timeout_s=3600.0)
            except XcclTimeout:
                continue
            finally:
                posted = None  # waited for: done, or released by the timeout
            seen_at = time.monotonic()
            tag = bytes(frames[0])
            try:
                if tag == ECHO:
                    await ep.send(src, frames, timeout_s=30.0)
                elif tag == STAMP:
                    await ep.send(src, [STAMP, np.array([seen_at], dtype=np.float64)], timeout_s=30.0)
                elif tag == INTO:
                    mode = bytes(frames[1])
                    into_src = None if mode == b"0" else src
                    into_buf = ep.window("into") if mode == b"w" else private_buf
                    reply = [INTO, json.dumps(ep.stats).encode()]
                    if into_src is not None:
                        # Post before replying: the sender's next message goes straight into the buffer.
                        posted = ep.post_recv(into_src, into_buf)
                    await ep.send(src, reply, timeout_s=30.0)
            except PeerUnreachable:
                # The bench closed its endpoint while our last reply waited for its acknowledgement
                # (it has what it measured): wait for the next sender, or for the bench to stop us.
                if posted is not None:
                    posted.cancel()
                    posted = None
                into_src = None

    try:
        await _serve_until_terminated(serve)
    finally:
        await ep.close()
        if fabric is not None:
            await fabric.close()

def main(argv: list[str]) -> int:
    import uvloop

    p = argparse.ArgumentParser(prog="python -m services.bench.xccl_peers")
    p.add_argument("role", choices=["zmq-echo", "grpc-sink", "xccl-echo"])
    p.add_argument("args", nargs="*")
    p.add_argument("--fabric", default=None, help="fabric-sim data address (xccl-echo)")
    p.add_argument("--peer-address", action="append", default=[], metavar="NAME=ADDR",
                   help="tcp directory entry of a peer (xccl-echo)")
    a = p.parse_args(argv)
    if a.role == "zmq-echo":
        coro = _zmq_echo_peer(a.args[0])
    elif a.role == "grpc-sink":
        coro = _grpc_sink_peer()
    else:
        directory = dict(entry.split("=", 1) for entry in a.peer_address)
        coro = _xccl_echo_peer(*a.args, fabric_address=a.fabric, directory=directory)
    uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
