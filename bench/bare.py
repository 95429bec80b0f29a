"""The yardstick server: a bare grpc.aio server whose handlers do nothing, so Submit and Watch
figures read against this machine's own gRPC limit. Run as `python -m bench.bare HOST:PORT`.

It also holds the memory yardstick for Watch fan-out (`stream_bytes`): what one open server stream
costs a process that does nothing else, measured the way bench.fanout measures the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from bench import cpu
from bench.client import OWN_CONNECTION, channel
from bench.stack import proc_bytes
from jobstream.embedded.ports import free_port
from jobstream.embedded.procs import ChildProcess
from jobstream.embedded.stack import REPO

UNARY = "/bench.Bare/Unary"
STREAM = "/bench.Bare/Stream"
# Streams opened but not yet answered, at most. A gRPC server cancels (at random, then all) calls
# that arrive while more than grpc.server.max_pending_requests (1,000 by default; hard limit 3,000)
# wait for the application to take them, so thousands of streams opened at once would partly fail:
# on the bare server and the gateway alike.
OPENING = 250


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

    def cpu_seconds(self) -> dict[str, float]:
        """The server's CPU seconds so far, as the process `server`."""
        return {"server": cpu.seconds(self.process.pid or 0)}


def rss_bytes(pid: int | None) -> int:
    """The process's resident set (VmRSS): the memory its open streams occupy as the machine sees
    it, whichever allocator (Python's, gRPC's C core) holds it."""
    found = None if pid is None else proc_bytes(pid, "status", "VmRSS:")
    if found is None:
        raise RuntimeError(f"cannot read the resident set of process {pid}")
    return found


async def stream_bytes(root: Path, streams: int, channels: int, within: float) -> float:
    """Bytes of a fresh bare server's memory per open stream, for `streams` streams spread over
    `channels` connections.

    One stream per connection opens first, so the connections and gRPC's one-off allocations sit in
    the baseline; the rest are opened and, once each has delivered its first message (so it is open
    on the server too), the growth is divided among them. The same protocol as bench.fanout's.
    """
    async with BareServer(root) as bare, contextlib.AsyncExitStack() as exits:
        chans = [await exits.enter_async_context(channel(bare.addr)) for _ in range(channels)]
        methods = [ch.unary_stream(STREAM, request_serializer=None, response_deserializer=None) for ch in chans]
        calls: list[grpc.aio.UnaryStreamCall[bytes, bytes]] = []
        opening = asyncio.Semaphore(OPENING)

        async def open_one(i: int) -> None:
            async with opening:
                call = methods[i % channels](b"")
                calls.append(call)
                await call.read()

        try:
            await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(channels))), within)
            before = rss_bytes(bare.process.pid)
            await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(channels, streams))), within)
            after = rss_bytes(bare.process.pid)
        finally:
            for call in calls:
                call.cancel()
        return (after - before) / (streams - channels)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
