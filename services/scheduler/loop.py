"""The scheduler's consume → record → publish → commit loop.

A batch of messages from the job-keyed topics becomes one Postgres transaction over the jobs it
touches; after the commit the resulting chunk tasks and events go to the publisher, which announces
them and only then commits the batch's Kafka offsets, while this loop goes on with the next batch.
A crash anywhere replays the batches not yet committed, and replaying is harmless because Postgres
decides what counts (chunk results recorded once, seq assigned once).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import time
import uuid
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from psycopg_pool import AsyncConnectionPool

from jobstream import topics
from jobstream.bus.v1 import bus_pb2
from jobstream.config import Settings
from jobstream.db import DATABASE_RETRY_SECONDS, DATABASE_UNAVAILABLE, retry_conflicts
from jobstream.kafka import GroupMember, Outgoing, decode, rewind_to_committed
from jobstream.service import essential
from services.scheduler import metrics, store
from services.scheduler.machine import JobMachine, JobWork, Outbound
from services.scheduler.publisher import Publisher
from services.scheduler.reconcile import Reconciler

log = logging.getLogger(__name__)

MAX_BATCH = 2000
MAX_IDLE_WAIT_MS = 200
SWEEP_SECONDS = 1.0
BROKER_CHECK_SECONDS = 2.0
# Jobs brought in line per transaction when a scheduler takes over partitions.
RECONCILE_BATCH = 200


class Ownership(ConsumerRebalanceListener):  # type: ignore[misc]
    """Which job partitions this scheduler owns, and at which epoch (see store.take_partitions).

    Partitions just assigned wait in `newly_assigned` until the loop raises their epoch and
    reconciles their jobs; a revoked partition's epoch is forgotten at once, so no batch writes to
    its jobs from then on.
    """

    def __init__(self, submitted_topic: str) -> None:
        self._topic = submitted_topic
        self.newly_assigned: set[int] = set()
        self.epochs: dict[int, int] = {}

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            if tp.topic == self._topic:
                self.epochs.pop(tp.partition, None)
                self.newly_assigned.discard(tp.partition)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        partitions = {tp.partition for tp in assigned if tp.topic == self._topic}
        if partitions:
            log.info("owning job partitions %s", sorted(partitions))
        self.newly_assigned |= partitions


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool,
        member: GroupMember,
        producer: AIOKafkaProducer,
        ownership: Ownership,
    ) -> None:
        self._settings = settings
        self._ownership = ownership
        self._reconciler = Reconciler(settings, pool)
        self._next_sweep = 0.0
        self._next_broker_check = 0.0
        self._pool = pool
        self._member = member
        self.publisher = Publisher(producer, self._consumer)
        self._machine = JobMachine(settings.progress_interval_ms / 1000)
        self._retries: list[tuple[float, uuid.UUID, int, int]] = []
        self._topic_of = {settings.topic(t): t for t in topics.SCHEDULER_TOPICS}
        # Who raised a partition's epoch, for operators reading partition_owners.
        self.owner = f"{settings.worker_id}/{os.getpid()}"

    async def run(self, stop: asyncio.Event) -> None:
        publishing = essential(self.publisher.run(), "scheduler publisher")
        try:
            while not stop.is_set():
                try:
                    await self._step()
                except DATABASE_UNAVAILABLE as err:
                    log.warning("Postgres unavailable (%s); replaying from the committed offsets when it answers", err)
                    await self._start_over()
                    await asyncio.sleep(DATABASE_RETRY_SECONDS)
            await self.publisher.drain()
        finally:
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing

    async def _step(self) -> None:
        phase = _Phases()
        batch = await self._consumer().getmany(timeout_ms=self._wait_ms(), max_records=MAX_BATCH)
        records = [r for rs in batch.values() for r in rs]
        phase.done("fetch")
        metrics.BATCH_MESSAGES.observe(len(records))
        work = self._collect(records)
        self._add_due(work)
        await self._add_reconciled(work)
        phase.done("reconcile")
        offsets = {tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs}
        if work:
            await self._process(work, offsets, phase, records)
        elif offsets:
            await self.publisher.put([], offsets)
            phase.done("handoff")

    async def _start_over(self) -> None:
        """Forgets what a failed batch did, as a scheduler taking over these partitions would.

        The batch's transaction rolled back, so its messages are read again from the committed
        offsets, and every owned job is reconciled from Postgres (which also brings back retries,
        progress flushes and lease checks that were due in the lost batch).
        """
        await self.publisher.drain()  # what was recorded is announced first, and its offsets committed
        await rewind_to_committed(self._consumer())
        self._machine = JobMachine(self._settings.progress_interval_ms / 1000)
        self._ownership.newly_assigned |= set(self.owned_partitions())

    def _consumer(self) -> AIOKafkaConsumer:
        return self._member.consumer

    def _wait_ms(self) -> int:
        due = [*self._machine.progress_due.values()]
        if self._retries:
            due.append(self._retries[0][0])
        if not due:
            return MAX_IDLE_WAIT_MS
        return max(0, min(MAX_IDLE_WAIT_MS, int((min(due) - time.monotonic()) * 1000)))

    def _collect(self, records: list[ConsumerRecord]) -> dict[uuid.UUID, JobWork]:
        work: dict[uuid.UUID, JobWork] = defaultdict(JobWork)
        for record in records:
            topic = self._topic_of.get(record.topic)
            try:
                if topic == topics.SUBMITTED:
                    submitted = decode(bus_pb2.JobSubmitted, record)
                    if submitted is not None:
                        work[uuid.UUID(submitted.job_id)].submitted = True
                elif topic == topics.PROGRESS:
                    report = decode(bus_pb2.ChunkReport, record)
                    if report is not None:
                        work[uuid.UUID(report.job_id)].reports.append(report)
                elif topic == topics.CONTROL:
                    control = decode(bus_pb2.JobControl, record)
                    if control is not None and control.type == bus_pb2.CANCEL:
                        work[uuid.UUID(control.job_id)].cancel_reason = control.reason
            except ValueError as err:  # a well-formed message naming no job: skip it, not every job behind it
                log.error("skipping message at %s[%d]@%d: %s", record.topic, record.partition, record.offset, err)
        return work

    def _add_due(self, work: dict[uuid.UUID, JobWork]) -> None:
        now = time.monotonic()
        for job_id, when in list(self._machine.progress_due.items()):
            if when <= now:
                del self._machine.progress_due[job_id]
                work[job_id].flush_progress = True
        while self._retries and self._retries[0][0] <= now:
            _, job_id, idx, attempt = heapq.heappop(self._retries)
            work[job_id].retries.append((idx, attempt))

    async def _add_reconciled(self, work: dict[uuid.UUID, JobWork]) -> None:
        """Adds what Postgres says is due: taken-over jobs, expired leases, deadlines, lost cancels."""
        now = time.monotonic()
        if now >= self._next_broker_check:
            self._next_broker_check = now + BROKER_CHECK_SECONDS
            try:
                if await self._reconciler.broker_wiped():
                    await self._member.renew()  # the new assignment reconciles what it owns
            except Exception as err:
                log.warning("checking the broker failed: %s", err)
        if self._ownership.newly_assigned:
            partitions = sorted(self._ownership.newly_assigned)
            epochs, ended = await store.take_over(self._pool, partitions, self.owner)
            if ended:
                log.warning("ended %d sessions of a previous owner that held partitions %s too long", ended, partitions)
            self._ownership.newly_assigned.clear()
            self._ownership.epochs.update(epochs)
            log.info("took job partitions %s at epochs %s", partitions, [epochs[p] for p in partitions])
            job_ids = await self._reconciler.unfinished_jobs(partitions)
            log.info("reconciling %d unfinished jobs on partitions %s", len(job_ids), partitions)
            for start in range(0, len(job_ids), RECONCILE_BATCH):
                await self._process({j: JobWork(reconcile=True) for j in job_ids[start : start + RECONCILE_BATCH]})
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            for job_id, found in (await self._reconciler.sweep(self.owned_partitions())).items():
                into = work[job_id]
                into.expired += found.expired
                into.deadline |= found.deadline
                if found.cancel_reason is not None and into.cancel_reason is None:
                    into.cancel_reason = found.cancel_reason

    async def _process(
        self,
        work: dict[uuid.UUID, JobWork],
        offsets: dict[TopicPartition, int] | None = None,
        phase: _Phases | None = None,
        records: list[ConsumerRecord] | None = None,
    ) -> None:
        out = await retry_conflicts(lambda: self._record(work), "scheduler batch")
        if phase:
            phase.done("record")
        if out.fenced:
            self._refused(out.fenced, offsets, records or [])
        for entry in out.retry_at:
            heapq.heappush(self._retries, entry)
        for kind, state, seconds in out.finished:
            metrics.JOBS_FINISHED.labels(kind=kind, state=state).inc()
            metrics.JOB_DURATION.labels(kind=kind).observe(seconds)
        for kind in out.retried:
            metrics.CHUNK_RETRIES.labels(kind=kind).inc()
        for kind in out.dead:
            metrics.DEAD_LETTERS.labels(kind=kind).inc()
        await self.publisher.put(self._messages(out), offsets)
        if phase:
            phase.done("handoff")

    async def _record(self, work: dict[uuid.UUID, JobWork]) -> Outbound:
        """One transaction over the jobs of the batch; what to publish once it committed.

        In pipeline mode, so only statements whose results the batch reads wait for Postgres: BEGIN
        goes with the lock, and the writes that end the batch go with COMMIT. A batch of progress
        reports is two round trips instead of six, which is time an event waits in the scheduler."""
        out = Outbound()
        async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            jobs = await store.lock_jobs(conn, list(work), dict(self._ownership.epochs))
            out.fenced = set(work) - {job.id for job in jobs}
            await self._machine.prepare(conn, jobs, work)
            for job in jobs:
                await self._machine.apply(conn, job, work[job.id], out)
            await self._machine.flush_chunks(conn)
            await store.save_jobs(conn, jobs)
            await store.insert_events(conn, [(uuid.UUID(e.job_id), e.seq, e.SerializeToString()) for e in out.events])
        return out

    def _refused(
        self, fenced: set[uuid.UUID], offsets: dict[TopicPartition, int] | None, records: list[ConsumerRecord]
    ) -> None:
        """Jobs the batch could not lock at this scheduler's epoch: their partition moved to another
        scheduler (or the job does not exist). Their partitions' offsets are not committed, so
        whoever owns them now, or this scheduler once it owns them again, reads their messages.
        Messages are keyed by job id, so the batch's records say which partitions those are."""
        metrics.FENCED_JOBS.inc(len(fenced))
        named = ", ".join(sorted(str(job_id) for job_id in fenced)[:3])
        log.warning("batch left %d jobs alone (%s): not owned by this scheduler at its epoch", len(fenced), named)
        if offsets is None:
            return
        keys = {str(job_id).encode() for job_id in fenced}
        for record in records:
            if record.key in keys:
                offsets.pop(TopicPartition(record.topic, record.partition), None)

    def owned_partitions(self) -> list[int]:
        """The job partitions this scheduler owns now: its jobs are the ones on them."""
        submitted = self._settings.topic(topics.SUBMITTED)
        return sorted(tp.partition for tp in self._consumer().assignment() if tp.topic == submitted)

    async def track_jobs(self, every_s: float = 5.0) -> None:
        while True:
            try:
                running, stalled = await store.count_running(self._pool, self.owned_partitions())
                metrics.JOBS_RUNNING.set(running)
                metrics.JOBS_STALLED.set(stalled)
            except Exception as err:
                log.warning("counting running jobs failed: %s", err)
            await asyncio.sleep(every_s)

    def _messages(self, out: Outbound) -> list[Outgoing]:
        topic = self._settings.topic
        chunk_partitions, job_partitions = self._settings.chunk_partitions, self._settings.job_partitions
        messages: list[Outgoing] = [
            (
                topic(topics.CHUNKS),
                topics.chunk_partition(t.job_id, t.chunk_index, t.attempt, chunk_partitions),
                f"{t.job_id}/{t.chunk_index}/{t.attempt}".encode(),
                t.SerializeToString(),
            )
            for t in out.tasks
        ]
        for name, keyed in (
            (topics.UPDATES, out.events),
            (topics.CONTROL, out.controls),
            (topics.DEAD_LETTER, out.dead_letters),
        ):
            messages += [
                (topic(name), topics.partition_of(m.job_id, job_partitions), m.job_id.encode(), m.SerializeToString())
                for m in keyed
            ]
        return messages


class _Phases:
    """Times the phases of one batch in the loop into the phase histogram."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def done(self, phase: str) -> None:
        now = time.monotonic()
        metrics.BATCH_PHASE.labels(phase=phase).observe(now - self._last)
        self._last = now
