"""Scenario 5: Watch fan-out. `streams` Watch streams held open on one gateway, spread evenly over
`fanout_channels` client connections and `fanout_jobs` running jobs: how late the jobs' progress
events reach them, and how much gateway memory each open stream costs next to a bare grpc.aio
server-streaming handler measured in the same run (bench.bare.stream_bytes).

The jobs: one demo.sleep chunk each, reporting every `fanout_step_ms` or up to half as long again
(job j of n every step * (1 + j / 2n)), so their reports spread over time as those of jobs started
at different moments do, instead of all arriving at once every step. A job's reports are
further apart than the scheduler's 200 ms coalescing, so none is held back: a progress event
carries the time of the worker's report, and its age on arrival is the delivery latency alone.
(demo.sleep reports after each of 20 steps, so a step of 250 ms would make a 5 s chunk: too short
to outlast the window.)

The streams open while no job runs, so opening them neither slows deliveries nor waits behind
them, and the memory reading holds streams only: a job with twice as many long, silent chunks as
the worker pool has slots fills every slot first (a worker fetches only as many tasks as it has
free slots), and cancelling it once the streams are open lets the fan-out jobs start.

A stream the gateway drops with UNAVAILABLE (its word for "retry shortly") is resumed after the
last event it received, as a client would, and counted in streams_resumed; any other end fails the
run.

Besides latency, the window records how much of it the gateway's event loop ran and how much it
waited, runnable, for a CPU (and the bench client's wait): on a shared machine, that says how much
of the latency is the machine's rather than the gateway's.

Memory: the gateway is restarted before each run. Memory that earlier streams (an earlier run, the
events scenario) freed stays in the process and new streams reuse it, so a long-lived gateway would
show a per-stream cost near zero; a fresh gateway against a fresh bare server compares like with
like. The growth of its VmRSS is divided among the streams, one stream per connection being open
in the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable

import grpc
import psycopg

from bench.bare import OPENING, rss_bytes, stream_bytes
from bench.client import Stub, channel, event_age, submit, watch_to_end
from bench.client import stub as make_stub
from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run, latencies_ms
from jobstream.events import is_terminal
from jobstream.states import ChunkState
from jobstream.v1 import jobstream_pb2 as pb

# Past this, a stage (opening the streams, filling the slots, every job reporting, every stream
# receiving the window's last report) is stuck, not slow.
STAGE_TIMEOUT_S = 180.0
STEPS = 20  # demo.sleep reports after each of 20 steps
# The slot-filling chunks report after 3 minutes, long after the streams have opened.
BLOCKER_MS = 3_600_000


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    if sizes.streams <= sizes.fanout_channels:
        raise ValueError("fan-out needs more streams than connections (one per connection is the baseline)")
    runs = []
    for _ in range(repeat):
        bare = await stream_bytes(stack.root, sizes.streams, sizes.fanout_channels, STAGE_TIMEOUT_S)
        await _fresh_gateway(stack)
        figures = await _one(stack, sizes)
        figures["bare_bytes_per_stream"] = bare
        figures["memory_vs_bare"] = figures["gateway_bytes_per_stream"] / bare
        runs.append(figures)
    return runs


async def _fresh_gateway(stack: BenchStack) -> None:
    """Restarts the gateway (see the module's docstring), out of the scenario guard's sight while
    it is down so the restart does not count as a crash."""
    gateway = stack.services.pop("gateway")
    try:
        await asyncio.to_thread(gateway.terminate, 30)
        gateway.start()  # from the event loop's (main) thread: the child's death signal is tied to it
    finally:
        stack.services["gateway"] = gateway
    await stack.wait_gateway()


async def _one(stack: BenchStack, sizes: Sizes) -> Run:
    submitted: list[str] = []
    async with contextlib.AsyncExitStack() as exits:
        chans = [
            await exits.enter_async_context(channel(stack.gateway_addr, stack.token))
            for _ in range(sizes.fanout_channels)
        ]
        stubs = [make_stub(ch) for ch in chans]
        try:
            blocker = await _fill_slots(stack, stubs[0])
            submitted.append(blocker)
            jobs = await asyncio.gather(
                *(submit(stubs[0], chunks=1, ms=_chunk_ms(sizes, j)) for j in range(sizes.fanout_jobs))
            )
            submitted += jobs
            return await _measure(stack, sizes, stubs, jobs, blocker)
        finally:
            await _end_jobs(stubs[0], submitted)


def _chunk_ms(sizes: Sizes, job: int) -> int:
    return int(sizes.fanout_step_ms * STEPS * (1 + job / sizes.fanout_jobs / 2))


async def _fill_slots(stack: BenchStack, stub: Stub) -> str:
    """Submits the job that fills every worker slot (see the module's docstring); returns its id
    once each slot runs one of its chunks. Twice as many chunks as slots, because the tasks spread
    over the workers' partitions unevenly and each worker must find one for every slot it has."""
    slots = stack.pool.count * (stack.pool.concurrency or stack.settings.worker_concurrency)
    blocker = await submit(stub, chunks=2 * slots, ms=BLOCKER_MS)
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as db:
        while True:
            cur = await db.execute(
                "SELECT count(*) FROM chunks WHERE job_id = %s AND state = %s", (uuid.UUID(blocker), ChunkState.RUNNING)
            )
            row = await cur.fetchone()
            running = int(row[0]) if row else 0
            if running >= slots:
                return blocker
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {running} of the pool's {slots} slots took a chunk within {STAGE_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(0.1)


async def _measure(stack: BenchStack, sizes: Sizes, stubs: list[Stub], jobs: list[str], blocker: str) -> Run:
    gateway = stack.services["gateway"].pid
    watchers = Watchers(stubs, jobs)
    try:
        # The first stream of each connection is in the baseline, with the connection itself.
        await watchers.open(range(len(stubs)), STAGE_TIMEOUT_S)
        before = rss_bytes(gateway)
        opening = time.monotonic()
        await watchers.open(range(len(stubs), sizes.streams), STAGE_TIMEOUT_S)
        open_s = time.monotonic() - opening
        after = rss_bytes(gateway)
        await stubs[0].Cancel(pb.CancelRequest(job_id=blocker, reason="the fan-out jobs may start"))
        await watchers.all_jobs_reporting(STAGE_TIMEOUT_S)
        cpu = (*_cpu_ns(gateway), *_cpu_ns(os.getpid()))
        seconds = await watchers.window(sizes.fanout_seconds)
        now = (*_cpu_ns(gateway), *_cpu_ns(os.getpid()))
        gateway_ran, gateway_waited, _, client_waited = (b - a for a, b in zip(cpu, now, strict=True))
        await watchers.drain(STAGE_TIMEOUT_S)
    finally:
        await watchers.close()
    ages = watchers.ages
    return {
        **latencies_ms("delivery", ages),
        "deliveries_per_s": len(ages) / seconds,
        "progress_events_per_s": watchers.reports / seconds,
        "streams": float(sizes.streams),
        "open_s": open_s,
        "streams_resumed": float(watchers.resumed),
        "gateway_bytes_per_stream": (after - before) / (sizes.streams - len(stubs)),
        "gateway_cpu_pct": gateway_ran / seconds / 1e7,
        "gateway_cpu_wait_pct": gateway_waited / seconds / 1e7,
        "client_cpu_wait_pct": client_waited / seconds / 1e7,
    }


def _cpu_ns(pid: int | None) -> tuple[int, int]:
    """Nanoseconds the process's main thread (its event loop) has run, and has waited runnable for
    a CPU."""
    with open(f"/proc/{pid}/schedstat") as f:
        ran, waited, _ = f.read().split()
    return int(ran), int(waited)


async def _end_jobs(stub: Stub, jobs: list[str]) -> None:
    """Cancels the jobs and waits for each one's terminal event, so the next scenario finds every
    worker slot free."""
    await asyncio.gather(*(stub.Cancel(pb.CancelRequest(job_id=job, reason="bench fan-out done")) for job in jobs))
    await asyncio.wait_for(asyncio.gather(*(watch_to_end(stub, job) for job in jobs)), STAGE_TIMEOUT_S)


class Watchers:
    """The held Watch streams, one reader task each, and what they saw.

    Stream i rides connection i % connections and watches job (i // connections) % jobs, so every
    connection carries as many streams of every job. A progress event counts when the worker's
    report behind it falls inside the window; reports from after the window tell a stream that it
    has received everything from inside it (a stream delivers in seq order).
    """

    def __init__(self, stubs: list[Stub], jobs: list[str]) -> None:
        self._stubs = stubs
        self._jobs = jobs
        self._calls: list[grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.JobEvent]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._opening = asyncio.Semaphore(OPENING)
        self._opened: set[int] = set()  # streams that received their first event
        self._reporting: set[int] = set()  # jobs whose progress some stream received
        self._past: set[int] = set()  # streams that received a report from after the window
        self._changed = asyncio.Event()  # one of those sets grew, or something went wrong
        self._problems: list[str] = []
        self._trouble = asyncio.Event()
        self._start = self._end = math.inf
        self._closing = False
        self._events: set[tuple[int, int]] = set()  # (job, seq) of the window's progress events
        self._stage = "starting"
        self.ages: list[float] = []
        self.resumed = 0  # open streams the gateway dropped (UNAVAILABLE) and that were resumed

    @property
    def reports(self) -> int:
        """Distinct progress events reported inside the window, over all jobs."""
        return len(self._events)

    def _where(self, i: int) -> tuple[int, int]:
        """Stream i's connection and job."""
        return i % len(self._stubs), (i // len(self._stubs)) % len(self._jobs)

    async def open(self, streams: range, within: float) -> None:
        """Opens these streams (numbered from where the last call stopped), at most OPENING at a
        time, and returns once each has received its first event."""
        self._stage = "opening the streams"
        self._tasks += [asyncio.create_task(self._read(i)) for i in streams]
        await self._until(lambda: len(self._opened) == streams.stop, within, lambda: self._lacking(streams, "opened"))

    async def all_jobs_reporting(self, within: float) -> None:
        """Returns once every job's chunk is running (its progress reached some stream)."""
        self._stage = "waiting for every job to report"

        def lacking() -> str:
            silent = [self._jobs[j] for j in range(len(self._jobs)) if j not in self._reporting]
            return f"{len(silent)} of {len(self._jobs)} jobs reported no progress: {', '.join(silent[:5])}"

        await self._until(lambda: len(self._reporting) == len(self._jobs), within, lacking)

    async def window(self, seconds: float) -> float:
        """The measurement window: the reports made in it count. Returns its length."""
        self._stage = "the window"
        self._start = time.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._trouble.wait(), seconds)
        self._end = time.time()
        self._check()
        return self._end - self._start

    async def drain(self, within: float) -> None:
        """Returns once every stream has received every report made in the window."""
        self._stage = "waiting for the window's last reports"
        streams = range(len(self._tasks))
        await self._until(lambda: len(self._past) == len(streams), within, lambda: self._lacking(streams, "drained"))

    async def close(self) -> None:
        """Cancels every stream; errors from here on are the cancellation's, not problems."""
        self._closing = True
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self, i: int) -> None:
        conn, job = self._where(i)
        where = f"stream {i} (connection {conn}, job {self._jobs[job]})"
        await self._opening.acquire()
        opening = True
        after_seq = 0
        try:
            while True:
                call = self._stubs[conn].Watch(pb.WatchRequest(job_id=self._jobs[job], after_seq=after_seq))
                self._calls.append(call)
                try:
                    async for event in call:
                        now = time.time()
                        after_seq = event.seq
                        if opening:
                            opening = False
                            self._opening.release()
                            self._opened.add(i)
                            self._changed.set()
                        if event.type == pb.JOB_PROGRESS:
                            self._progress(i, job, event, now)
                        elif is_terminal(event):
                            name = pb.EventType.Name(event.type)
                            self._problem(f"{where}: the job ended ({name}) while its streams were held")
                            return
                    self._problem(f"{where}: the stream ended without a terminal event")
                    return
                except grpc.aio.AioRpcError as err:
                    if self._closing:
                        return
                    if err.code() != grpc.StatusCode.UNAVAILABLE or opening:
                        self._problem(f"{where}: {err.code().name}: {err.details()}")
                        return
                    # The gateway dropped an open stream and asks for a retry: resume as a client
                    # would, and count it.
                    self.resumed += 1
        finally:
            if opening:
                self._opening.release()

    def _progress(self, i: int, job: int, event: pb.JobEvent, now: float) -> None:
        age = event_age(event, now)
        reported = now - age
        if job not in self._reporting:
            self._reporting.add(job)
            self._changed.set()
        if self._start <= reported <= self._end:
            self.ages.append(age)
            self._events.add((job, event.seq))
        elif reported > self._end and i not in self._past:
            self._past.add(i)
            self._changed.set()

    def _problem(self, text: str) -> None:
        self._problems.append(text)
        self._trouble.set()
        self._changed.set()

    def _check(self) -> None:
        if self._problems:
            more = f" (and {len(self._problems) - 1} more)" if len(self._problems) > 1 else ""
            raise RuntimeError(f"{self._stage}: {self._problems[0]}{more}")

    async def _until(self, done: Callable[[], bool], within: float, lacking: Callable[[], str]) -> None:
        """Waits until `done()`; raises with `lacking()` after `within` seconds, or at the first problem."""
        deadline = time.monotonic() + within
        while not done():
            self._check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self._stage}: {lacking()} within {within:.0f} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        self._check()

    def _lacking(self, streams: range, what: str) -> str:
        have = self._opened if what == "opened" else self._past
        missing = [i for i in streams if i not in have]
        conns = Counter(self._where(i)[0] for i in missing)
        jobs = {self._where(i)[1] for i in missing}
        listed = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        per_conn = ", ".join(f"{c}: {n}" for c, n in sorted(conns.items()))
        return (
            f"{len(missing)} of {len(streams)} streams not {what} (streams {listed}; "
            f"per connection {per_conn}; on {len(jobs)} of {len(self._jobs)} jobs)"
        )
