"""Scenario 4: event latency, from a worker reporting progress to a Watch client receiving it, at
about `event_rate` events per second.

Each job runs one demo.sleep chunk that reports every 250 ms, and the scheduler passes on at most
one progress event per job per 200 ms, so each job yields about 4 events a second and the rate
comes from running rate/4 jobs at once. A progress event carries the time of the worker report
behind it, so its age on arrival is the latency asked for. Each run also splits that latency where
the scheduler published the event (bench.published): `until_published` and `since_published`.

The first second is the scenario's worst: the 250 jobs are submitted and their Watch streams opened
at once, and their first reports land while the gateway is still opening them (docs/capacity.md).
`event_after_first_second` is the same latency without the events that arrived in it, so a report
shows how much of the run's p99 that second makes. The target is judged on the whole run.
"""

from __future__ import annotations

import asyncio

from bench.client import Stub, channel, event_time, submit, watch_to_end
from bench.client import stub as make_stub
from bench.published import EventKey, Published, split_at_publish
from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run, latencies_ms
from jobstream.v1 import jobstream_pb2 as pb

EVENTS_PER_JOB_PER_S = 4
STEP_MS = 250
FIRST_SECOND_S = 1.0


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    jobs = max(1, sizes.event_rate // EVENTS_PER_JOB_PER_S)
    # demo.sleep takes at most 20 steps of 250 ms; longer windows need more jobs one after another.
    ms = min(int(sizes.event_seconds * 1000), 20 * STEP_MS)
    runs = []
    async with channel(stack.gateway_addr, stack.token) as ch:
        stub = make_stub(ch)
        for _ in range(repeat):
            async with Published(stack.settings) as published:
                run, seen = await _one(stub, jobs, ms)
                until, since = split_at_publish(seen, await published.read())
            runs.append({**run, **latencies_ms("until_published", until), **latencies_ms("since_published", since)})
            await asyncio.sleep(0.5)
    return runs


async def _one(stub: Stub, jobs: int, ms: int) -> tuple[Run, dict[EventKey, tuple[float, float]]]:
    """The run's figures, and each progress event's (time, arrival) by (job id, seq)."""
    times: dict[EventKey, tuple[float, float]] = {}

    def seen(event: pb.JobEvent, now: float) -> None:
        if event.type == pb.JOB_PROGRESS:
            times[(event.job_id, event.seq)] = (event_time(event), now)

    async def job() -> None:
        await watch_to_end(stub, await submit(stub, chunks=1, ms=ms), seen)

    await asyncio.gather(*(job() for _ in range(jobs)))
    ages = [arrival - at for at, arrival in times.values()]
    arrivals = [arrival for _, arrival in times.values()]
    first, last = (min(arrivals), max(arrivals)) if arrivals else (0.0, 0.0)
    window = last - first
    rate = len(arrivals) / window if window else 0.0
    later = [arrival - at for at, arrival in times.values() if arrival - first >= FIRST_SECOND_S]
    figures = {**latencies_ms("event", ages), **latencies_ms("event_after_first_second", later)}
    return {**figures, "events_per_s": rate, "jobs": float(jobs)}, times
