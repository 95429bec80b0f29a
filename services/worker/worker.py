"""The worker loop: fetch chunk tasks, claim them, run them as slots free.

A worker may claim a few chunks more than it has free slots (see window.py); claimed chunks wait
for one of `worker_concurrency` slots.

Offsets are committed right after the claim: from then on Postgres (the lease) holds the chunk,
not Kafka, so a worker that dies mid-chunk loses nothing: its lease expires and the chunk is
dispatched again. A chunk that finished here keeps its lease until the scheduler has recorded its
report, which goes out again while it stays unrecorded.

A second listener reads every cancel on jobs.control and interrupts the chunks of that job that
run here. It reads only while the worker claims or runs chunks: before a claim the feed is read
from its end, so a cancel either was in Postgres before the claim (which then refuses the chunk)
or comes on the feed; an idle worker fetches nothing from jobs.control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from psycopg_pool import AsyncConnectionPool

from jobstream import topics
from jobstream.bus.v1 import bus_pb2
from jobstream.config import Settings
from jobstream.db import DATABASE_RETRY_SECONDS, DATABASE_UNAVAILABLE, broker_epoch
from jobstream.kafka import (
    GroupMember,
    Outgoing,
    assign_all_unread,
    decode,
    follow_partition_changes,
    make_broadcast_consumer,
    partitions_read,
    read_from_end,
    retry_broker_errors,
    rewind_to_committed,
    send_all,
)
from jobstream.service import essential
from services.worker import claims, metrics
from services.worker.claims import ChunkKey
from services.worker.runner import ChunkRun
from services.worker.window import ClaimWindow

log = logging.getLogger(__name__)

# A job seen cancelled is remembered this long, so its late-arriving tasks are dropped unclaimed.
CANCELLED_MEMORY_SECONDS = 3600.0
# A reported chunk's lease is kept alive for at most this many lease times.
REPORTED_MEMORY_LEASES = 30
# A finished chunk only waits for the scheduler to record it: its lease is extended this many
# lease times at once, and renewed once less than half of that is left. Rewriting every waiting
# row every beat made the beat itself outlast the lease once thousands waited behind a paused
# scheduler, whose open transaction kept Postgres from pruning the old row versions.
REPORTED_LEASE_FACTOR = 4
# A finished chunk still unrecorded this many lease times after its report went out has its report
# sent again, then again after twice as long, and so on: a report can be lost on the way, and the
# scheduler counts a report once however often it comes. A broker that came back empty lost every
# report it had not delivered: those are sent again as soon as a heartbeat sees its new epoch.
REPORT_RESEND_LEASES = 2.0
# A worker with no chunk claimed or running for this long stops reading the cancel feed; a
# little slack keeps a worker fed chunk after chunk from seeking the feed again between them.
CANCEL_FEED_IDLE_SECONDS = 2.0
# How long a claim waits for the cancel feed to be read from now on. Past it the claim goes on,
# and a cancel the feed misses meanwhile reaches the job's chunks through the heartbeat.
CANCEL_FEED_START_SECONDS = 2.0


@dataclass(slots=True)
class Reported:
    """A chunk that finished here, until the scheduler has recorded its outcome. A worker holds
    the chunks of a few tens of seconds (tens of thousands when chunks take a millisecond), so the
    report is kept as its encoding: about 140 bytes instead of about 900 as a message object."""

    at: float  # monotonic time it finished
    lease_until: float  # the stored lease lasts at least until then (monotonic)
    report: bytes  # the encoded report that ended the attempt
    resend_at: float  # when to send the report again if the chunk is still unrecorded (monotonic)
    resend_every: float  # seconds until the resend after that


class Worker:
    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool,
        member: GroupMember,
        producer: AIOKafkaProducer,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._member = member
        self._broker_epoch: int | None = None
        self._renew = False
        self._producer = producer
        self._running: dict[ChunkKey, ChunkRun] = {}
        # Chunks that finished here and were reported, until the scheduler has recorded their
        # outcome: their lease is kept alive meanwhile, because a scheduler working through a
        # backlog of reports longer than the lease would otherwise take this worker for lost and
        # run them all again (a 100,000-chunk job ran twice over that way).
        self._reported: dict[ChunkKey, Reported] = {}
        self._slot_free = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._window = ClaimWindow(settings.worker_concurrency, settings.worker_prefetch)
        self._cancelled: dict[str, float] = {}
        self._control = make_broadcast_consumer(settings, settings.kafka_control_fetch_wait_ms)
        self._claiming = False
        self._busy_at = 0.0  # monotonic time the worker last claimed or ran a chunk
        metrics.CONCURRENCY.set(settings.worker_concurrency)
        metrics.IN_FLIGHT.set_function(lambda: sum(run.started for run in self._running.values()))
        metrics.CLAIMED_WAITING.set_function(lambda: sum(not run.started for run in self._running.values()))
        metrics.CANCEL_FEED_PARTITIONS_READ.set_function(lambda: len(partitions_read(self._control)))

    async def run(self, stop: asyncio.Event) -> None:
        await self._control.start()
        control = self._settings.topic(topics.CONTROL)
        await assign_all_unread(self._control, control)
        helpers = [
            essential(self._listen_control(), "cancel listener"),
            essential(self._heartbeat(), "lease heartbeat"),
            essential(follow_partition_changes(self._control, control), "control partition watch"),
        ]
        try:
            await self._fetch_loop(stop)
            await self._drain()
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._control.stop()

    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            free = self._window.size - len(self._running)
            if free <= 0:
                self._slot_free.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_free.wait(), 0.5)
                continue
            if self._renew:
                self._renew = False
                await self._member.renew()
            batch = await self._member.consumer.getmany(timeout_ms=200, max_records=free)
            decoded = [decode(bus_pb2.ChunkTask, r) for rs in batch.values() for r in rs]
            tasks = [t for t in decoded if t is not None]
            if not tasks:
                continue
            wanted = [t for t in tasks if t.job_id not in self._cancelled]
            if not await self._claim_and_start(wanted):
                continue
            # After the starts, so no chunk waits for the broker: Postgres already holds the claims.
            with contextlib.suppress(KafkaError):
                await self._member.consumer.commit()

    async def _claim_and_start(self, tasks: list[bus_pb2.ChunkTask]) -> bool:
        """Claims the tasks and starts the chunks it got; False when Postgres did not answer, and
        the tasks are to be read again. The cancel feed is read throughout."""
        self._claiming = True
        try:
            await self._read_cancels_from_now()
            claimed_from = time.monotonic()
            try:
                held = await claims.claim(self._pool, tasks, self._settings.worker_id, self._settings.lease_seconds)
            except DATABASE_UNAVAILABLE as err:
                # Unclaimed, the tasks are still Kafka's: read them again once Postgres answers.
                log.warning("claiming %d chunks failed, Postgres unavailable: %s", len(tasks), err)
                await rewind_to_committed(self._member.consumer)
                await asyncio.sleep(DATABASE_RETRY_SECONDS)
                return False
            for task in tasks:
                if (task.job_id, task.chunk_index) in held:
                    self._start(task, claimed_from + self._settings.lease_seconds)
            return True
        finally:
            self._claiming = False
            self._busy_at = time.monotonic()

    def _start(self, task: bus_pb2.ChunkTask, lease_until: float) -> None:
        run = ChunkRun(task, self._settings.worker_id, self._send_report, self._slots)
        run.lease_until = lease_until
        self._running[run.key] = run
        run.asyncio_task = asyncio.create_task(run.run())
        run.asyncio_task.add_done_callback(lambda _: self._finished(run))
        if task.job_id in self._cancelled:
            # The cancel came while the claim (made before it) was under way, so cancel_job found
            # no run of the job: this one reports itself stopped instead of running.
            run.cancel()

    def _finished(self, run: ChunkRun) -> None:
        self._running.pop(run.key, None)
        if run.ran_s is not None:
            self._window.ran(run.ran_s)
        if run.outcome is not None and run.asyncio_task is not None and not run.asyncio_task.cancelled():
            now = time.monotonic()
            every = REPORT_RESEND_LEASES * self._settings.lease_seconds
            report = run.outcome.SerializeToString()
            self._reported[run.key] = Reported(now, run.lease_until, report, now + every, every)
        self._slot_free.set()

    async def _send_report(self, report: bus_pb2.ChunkReport) -> None:
        """Queues the report, retrying while the broker is not ready for it. A report the broker
        then loses is sent again by the heartbeat (an ending one, while its chunk stays unrecorded);
        the scheduler counts a report once, however often it arrives."""
        what = f"job {report.job_id} chunk {report.chunk_index} attempt {report.attempt}: sending its report"
        message = self._message(report.job_id, report.SerializeToString())
        delivered = await retry_broker_errors(lambda: send_all(self._producer, [message]), what)
        for future in delivered:
            future.add_done_callback(lambda done: _log_undelivered(report, done))

    def _message(self, job_id: str, report: bytes) -> Outgoing:
        return (
            self._settings.topic(topics.PROGRESS),
            topics.partition_of(job_id, self._settings.job_partitions),
            job_id.encode(),
            report,
        )

    async def _read_cancels_from_now(self) -> None:
        """Before a claim: the cancel feed is read from an offset no later than now. A cancel is
        recorded in Postgres before it is published, so one the claim does not see comes after it."""
        paused = self._control.paused()
        if not paused:
            return
        try:
            await asyncio.wait_for(read_from_end(self._control, *paused), CANCEL_FEED_START_SECONDS)
        except (KafkaError, TimeoutError) as err:
            log.warning("reading the cancel feed from its end failed (%r); reading on from where it stopped", err)
            self._control.resume(*paused)

    def _stop_reading_cancels_when_idle(self, now: float) -> None:
        if self._claiming or self._running:
            self._busy_at = now
        elif now - self._busy_at >= CANCEL_FEED_IDLE_SECONDS:
            reading = partitions_read(self._control)
            if reading:
                self._control.pause(*reading)

    async def _listen_control(self) -> None:
        while True:
            try:
                batch = await self._control.getmany(timeout_ms=1000)
            except KafkaError as err:
                log.warning("control feed interrupted: %s", err)
                await asyncio.sleep(1)
                continue
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    control = decode(bus_pb2.JobControl, record)
                    if control is not None and control.type == bus_pb2.CANCEL:
                        self._cancelled[control.job_id] = now
                        self.cancel_job(control.job_id)
            for job_id, seen in list(self._cancelled.items()):
                if now - seen > CANCELLED_MEMORY_SECONDS:
                    del self._cancelled[job_id]
            self._stop_reading_cancels_when_idle(now)

    def cancel_job(self, job_id: str) -> None:
        for run in list(self._running.values()):
            if run.job_id == job_id:
                log.info("job %s chunk %d: interrupted by cancel", job_id, run.chunk_index)
                run.cancel()

    async def _heartbeat(self) -> None:
        lease = self._settings.lease_seconds
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            self._forget_reported_older_than(REPORTED_MEMORY_LEASES * lease)
            started = time.monotonic()
            try:
                epoch = await broker_epoch(self._pool)
                if self._broker_epoch is not None and epoch != self._broker_epoch:
                    self._broker_came_back_empty(started)
                self._broker_epoch = epoch
                leases = self._leases_to_keep(started)
                beat = await claims.heartbeat(self._pool, leases, self._settings.worker_id)
            except Exception as err:  # a missed beat is survivable; the lease outlasts several
                log.warning(
                    "heartbeat failed (%d chunks running here, %d finished and unrecorded): %s",
                    len(self._running),
                    len(self._reported),
                    err,
                )
                continue
            for key, seconds in leases.items():
                if key in beat.extended:
                    self._extended(key, started + seconds)
                elif key not in beat.held:
                    self._reported.pop(key, None)  # recorded by the scheduler, or taken over
            for job_id in beat.stopped_jobs:
                self._cancelled.setdefault(job_id, time.monotonic())
                self.cancel_job(job_id)
            for key in leases:
                run = self._running.get(key)
                if key not in beat.held and run is not None:
                    # The lease went to another attempt (this worker stalled past it): stop, report nothing.
                    log.warning("job %s chunk %d: lease lost, stopping this attempt", run.job_id, run.chunk_index)
                    run.abandon()
            await self._resend_reports(
                reports_to_resend(leases, beat.held, self._running, self._reported, started), started
            )

    def _broker_came_back_empty(self, now: float) -> None:
        """The broker lost what it held: the consumer group, and reports the scheduler had not read yet."""
        log.warning("the broker came back empty; rejoining, and sending unrecorded reports again")
        self._renew = True
        for reported in self._reported.values():
            reported.resend_at = now

    def _leases_to_keep(self, now: float) -> dict[ChunkKey, float]:
        """Running chunks are kept fresh every beat; finished ones only kept alive (see
        REPORTED_LEASE_FACTOR), so most beats write none of them. A finished chunk due for its
        report to be sent again goes along, for the beat to say whether it is still unrecorded."""
        reported_lease = REPORTED_LEASE_FACTOR * self._settings.lease_seconds
        leases = {
            key: reported_lease
            for key, reported in self._reported.items()
            if reported.lease_until - now < reported_lease / 2 or reported.resend_at <= now
        }
        leases.update(dict.fromkeys(self._running, self._settings.lease_seconds))
        return leases

    async def _resend_reports(self, keys: list[ChunkKey], now: float) -> None:
        """Sends again the reports of chunks that finished here and that Postgres still shows
        running on this worker, and puts off their next resend twice as long.

        A resend the producer refuses (a broker that came back empty lists a topic with too few
        partitions until the scheduler re-creates it) is not put off: the next beat tries again.
        Put off anyway, each refusal doubled the wait, and the try after the broker recovered
        could come too late for the chunk's lease."""
        if not keys:
            return
        messages = [self._message(job_id, self._reported[(job_id, idx)].report) for job_id, idx in keys]
        first = bus_pb2.ChunkReport.FromString(messages[0][3])
        log.warning(
            "%d chunks that finished here are still unrecorded (job %s chunk %d attempt %d among them);"
            " sending their reports again",
            len(messages),
            first.job_id,
            first.chunk_index,
            first.attempt,
        )
        try:
            # Bounded: the producer waits up to its request timeout for a topic's metadata, longer
            # than a lease, and the beats that keep the leases come from this same loop.
            await asyncio.wait_for(send_all(self._producer, messages), self._settings.heartbeat_seconds)
        except (KafkaError, TimeoutError) as err:
            log.warning("sending %d reports again failed (%r); the next heartbeat tries again", len(messages), err)
            return
        metrics.REPORTS_RESENT.inc(len(messages))
        for key in keys:
            if (reported := self._reported.get(key)) is not None:
                reported.resend_at = now + reported.resend_every
                reported.resend_every *= 2

    def _extended(self, key: ChunkKey, lease_until: float) -> None:
        run = self._running.get(key)
        if run is not None:
            run.lease_until = lease_until
        elif key in self._reported:
            self._reported[key].lease_until = lease_until

    def _forget_reported_older_than(self, seconds: float) -> None:
        """A bound for reports whose outcome never shows up as recorded (the heartbeat keeps failing)."""
        oldest = time.monotonic() - seconds
        for key in [k for k, reported in self._reported.items() if reported.at < oldest]:
            del self._reported[key]

    async def _drain(self) -> None:
        """Lets running chunks finish within the drain time and gives the rest back to run elsewhere,
        claimed chunks that have not started at once."""
        await self._hand_back([run for run in self._running.values() if not run.started])
        if self._running:
            log.info("draining %d running chunks (up to %.0fs)", len(self._running), self._settings.drain_seconds)
            pending = [r.asyncio_task for r in self._running.values() if r.asyncio_task]
            await asyncio.wait(pending, timeout=self._settings.drain_seconds)
        await self._hand_back(list(self._running.values()))
        await self._producer.flush()

    async def _hand_back(self, runs: list[ChunkRun]) -> None:
        for run in runs:
            run.abandon()
            if run.asyncio_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await run.asyncio_task
            log.info("job %s chunk %d attempt %d: handed back", run.job_id, run.chunk_index, run.attempt)
            await run.release()


def _log_undelivered(report: bus_pb2.ChunkReport, delivery: asyncio.Future[Any]) -> None:
    """A report the broker did not take: the chunk's outcome reaches the scheduler only when it is
    sent again (an ending report is, while the chunk stays unrecorded)."""
    if not delivery.cancelled() and delivery.exception() is not None:
        log.warning(
            "job %s chunk %d attempt %d: the broker did not take its %s report: %r",
            report.job_id,
            report.chunk_index,
            report.attempt,
            bus_pb2.ReportType.Name(report.type),
            delivery.exception(),
        )


def reports_to_resend(
    beaten: Iterable[ChunkKey],
    held: set[ChunkKey],
    running: Container[ChunkKey],
    reported: Mapping[ChunkKey, Reported],
    now: float,
) -> list[ChunkKey]:
    """The chunks a heartbeat took along whose report is due to go out again: still running on
    this worker in Postgres, finished here (a chunk running when the beat began may have ended
    during it, reported or not), and past their resend time."""
    return [
        key
        for key in beaten
        if key in held and key not in running and (r := reported.get(key)) is not None and r.resend_at <= now
    ]
