"""Scenario 3: Submit latency at a steady open-loop rate from one caller, and throughput and
latency with many closed-loop callers, against the gateway and against a bare unary handler.

With the closed-loop callers it also reports what a call costs in CPU, in every process: the
stack's per Submit (until the jobs those Submits made have run), the bare handler's per call,
each with the callers' own share. Rates move with the host's speed from run to run; what a call
costs moves much less, and says where a Submit's time goes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bench import cpu
from bench.bare import UNARY, BareServer
from bench.client import channel, params
from bench.client import stub as make_stub
from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run, latencies_ms
from jobstream.v1 import jobstream_pb2 as pb

Call = Callable[[], Awaitable[object]]


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    runs = []
    request = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0))
    async with (
        channel(stack.gateway_addr, stack.token) as ch,
        BareServer(stack.root) as bare,
        channel(bare.addr) as bare_ch,
    ):
        stub = make_stub(ch)
        bare_call = bare_ch.unary_unary(UNARY, request_serializer=None, response_deserializer=None)

        def submit() -> Awaitable[object]:
            return stub.Submit(request)

        def nothing() -> Awaitable[object]:
            return bare_call(b"")

        for _ in range(repeat):
            # Each phase starts once the jobs of the one before have run, on a quiet stack.
            figures: Run = {}
            await stack.wait_quiet()
            figures.update(await _open_loop(submit, sizes.open_loop_rate, sizes.open_loop_seconds, "open_loop"))
            await stack.wait_quiet()
            before = cpu.with_client(cpu.by_service(stack))
            figures.update(await _closed_loop(submit, sizes.callers, sizes.closed_loop_seconds, "callers"))
            await stack.wait_quiet()
            figures.update(_cost("callers", before, cpu.with_client(cpu.by_service(stack)), figures))
            before = cpu.with_client(bare.cpu_seconds())
            figures.update(await _closed_loop(nothing, sizes.callers, sizes.closed_loop_seconds, "bare_callers"))
            figures.update(_cost("bare_callers", before, cpu.with_client(bare.cpu_seconds()), figures))
            figures["callers_cpu_vs_bare"] = figures["callers_cpu_ms_total"] / figures["bare_callers_cpu_ms_total"]
            # The open-loop rate against the bare handler: this machine's floor under the Submit p99.
            figures.update(await _open_loop(nothing, sizes.open_loop_rate, sizes.open_loop_seconds, "bare_open_loop"))
            figures["callers_vs_bare"] = figures["callers_per_s"] / figures["bare_callers_per_s"]
            runs.append(figures)
    return runs


def _cost(name: str, before: dict[str, float], after: dict[str, float], figures: Run) -> Run:
    """CPU milliseconds per call of the `name` phase, by process and in all."""
    cost = cpu.per_unit(f"{name}_cpu_ms", before, after, figures[f"{name}_samples"])
    cost[f"{name}_cpu_ms_total"] = sum(cost.values())
    return cost


async def _open_loop(call: Call, rate: int, seconds: float, name: str) -> Run:
    """Calls at fixed times whatever the answers do; latency counts from the time a call was due,
    so a stall shows up in every call it delays (no coordinated omission)."""
    latencies: list[float] = []
    count = int(rate * seconds)
    start = time.perf_counter()

    async def one(due: float) -> None:
        await call()
        latencies.append(time.perf_counter() - due)

    tasks = []
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {**latencies_ms(name, latencies), f"{name}_achieved_per_s": count / elapsed}


async def _closed_loop(call: Call, callers: int, seconds: float, name: str) -> Run:
    """`callers` loops, each calling again as soon as its answer arrives, for `seconds`."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while (sent := time.perf_counter()) < end:
            await call()
            latencies.append(time.perf_counter() - sent)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - start
    return {**latencies_ms(name, latencies), f"{name}_per_s": len(latencies) / elapsed}
