"""Scenario 1: chunk throughput with 1, 2 and 4 workers, from the first Submit to the last terminal
event seen by clients watching every job."""

from __future__ import annotations

import asyncio
import time

from bench.client import Stub, channel, submit, watch_to_end
from bench.client import stub as make_stub
from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    runs: list[Run] = [{} for _ in range(repeat)]
    async with channel(stack.gateway_addr, stack.token) as ch:
        stub = make_stub(ch)
        # Growing the pool only: a stopped worker holds its partitions until its session expires.
        for workers in sizes.worker_counts:
            await stack.set_workers(workers)
            for run_ in runs:
                run_[f"workers_{workers}_chunks_per_s"] = await _one(stub, sizes.jobs, sizes.chunks_per_job)
    return runs


async def _one(stub: Stub, jobs: int, chunks: int) -> float:
    started = time.time()

    async def job() -> float:
        job_id = await submit(stub, chunks=chunks, ms=0)
        return await watch_to_end(stub, job_id)

    ends = await asyncio.gather(*(job() for _ in range(jobs)))
    return jobs * chunks / (max(ends) - started)
