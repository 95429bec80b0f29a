"""The yardstick server: a bare grpc.aio server whose handlers do nothing, so Submit and Watch
figures read against this machine's own gRPC limit. Run as `python -m bench.bare HOST:PORT`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from bench.client import OWN_CONNECTION
from jobstream.embedded.ports import free_port
from jobstream.embedded.procs import ChildProcess
from jobstream.embedded.stack import REPO

UNARY = "/bench.Bare/Unary"
STREAM = "/bench.Bare/Stream"


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b""


async def _stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    # One message, so the client knows the stream is open, then held open like a Watch on a quiet job.
    yield b"x"
    await asyncio.Event().wait()


async def _serve(listen: str) -> None:
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bare", handlers),))
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


class BareServer:
    """The yardstick as a child process, as the gateway is one."""

    def __init__(self, root: Path) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "bench.bare", self.addr]
        self.process = ChildProcess("bare", argv, log_path=root / "logs" / "bare.log", cwd=REPO)

    async def __aenter__(self) -> BareServer:
        self.process.start()
        async with grpc.aio.insecure_channel(self.addr, options=OWN_CONNECTION) as ch:
            await asyncio.wait_for(ch.channel_ready(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The server holds nothing: no reason to wait for it.
        self.process.kill()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
