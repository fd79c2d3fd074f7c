"""RPC over real ZeroMQ sockets: replies, typed remote errors, garbage, push, dead peer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import zmq

from services.common.rpc import RemoteError, RpcClient, RpcServer, RpcTimeout
from services.common.status import Code
from services.common.wire import message


@message("test.rpc.Echo")
@dataclass(frozen=True, slots=True)
class Echo:
    text: str


SERVER = """
import asyncio, sys
from dataclasses import dataclass
from services.common.rpc import RpcServer, RemoteError
from services.common.wire import message

@message("test.rpc.Echo")
@dataclass(frozen=True, slots=True)
class Echo:
    text: str

async def main():
    async def handle(msg, ident):
        if msg.text == "refuse":
            raise RemoteError("NOT_FOUND", "no such thing")
        if msg.text == "boom":
            raise ZeroDivisionError("handler bug")
        if msg.text == "hang":
            await asyncio.sleep(3600)
        return Echo(msg.text.upper())
    srv = RpcServer(sys.argv[1], handle)
    srv.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture
def server(tmp_path):
    addr = f"ipc://{tmp_path}/rpc.sock"
    p = subprocess.Popen([sys.executable, "-c", SERVER, addr], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield addr, p
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(5)


async def test_calls_errors_garbage_and_dead_peer(server) -> None:
    addr, proc = server
    client = RpcClient(addr)
    try:
        replies = await asyncio.gather(*(client.call(Echo(f"m{i}"), timeout_s=5) for i in range(50)))
        assert [r.text for r in replies] == [f"M{i}" for i in range(50)]
        with pytest.raises(RemoteError) as exc:
            await client.call(Echo("refuse"))
        assert exc.value.code == "NOT_FOUND" and "no such thing" in exc.value.message
        with pytest.raises(RemoteError, match="INTERNAL: ZeroDivisionError"):
            await client.call(Echo("boom"))
        with pytest.raises(RpcTimeout):
            await client.call(Echo("hang"), timeout_s=0.2)
        # Garbage from a raw peer: the server answers INVALID_ARGUMENT and keeps serving.
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(addr)
        raw.send_multipart([(7).to_bytes(8, "little"), b"\xc1not msgpack"])
        assert raw.poll(5000)
        rid, *frames = raw.recv_multipart()
        from services.common.wire import decode
        failed = decode(frames)
        assert int.from_bytes(rid, "little") == 7 and failed.code is Code.INVALID_ARGUMENT
        raw.send_multipart([b"short"])                                  # no request id: dropped
        raw.close(0)
        assert (await client.call(Echo("still up"))).text == "STILL UP"
        proc.kill()
        proc.wait(5)
        with pytest.raises(RpcTimeout):
            await client.call(Echo("anyone?"), timeout_s=0.3)
    finally:
        await client.close()


async def test_push_reaches_the_client(tmp_path) -> None:
    pushed: asyncio.Queue = asyncio.Queue()
    idents: list[bytes] = []

    async def handle(msg, ident):
        idents.append(ident)
        return None

    srv = RpcServer(f"ipc://{tmp_path}/push.sock", handle)
    srv.start()
    client = RpcClient(srv.address, on_push=pushed.put_nowait)
    try:
        await client.call(Echo("hello"))          # a one-way reply is Ok
        srv.push(idents[0], Echo("token"))
        assert (await asyncio.wait_for(pushed.get(), 5)).text == "token"
    finally:
        await client.close()
        await srv.close()
