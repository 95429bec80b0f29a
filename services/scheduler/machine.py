"""The job state machine: what one batch of messages does to one locked job.

Everything here runs inside the batch transaction holding the job's row lock. It changes the
JobRow in memory, writes chunk rows through the store, and appends what must go out after the
commit (events, chunk tasks, dead letters, control messages) to an Outbound. Publishing only after
the commit means a crash can lose a message but never announce something Postgres does not hold.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from jobstream.bus.v1 import bus_pb2
from jobstream.events import now_timestamp, to_struct
from jobstream.job_options import allows_partial, chunk_timeout_s, retry_policy
from jobstream.kinds import JobKind, get_kind
from jobstream.progress import ProgressTracker
from jobstream.states import JobState
from jobstream.v1 import jobstream_pb2 as pb
from services.scheduler import store
from services.scheduler.pacing import ProgressPacer
from services.scheduler.store import Conn, JobRow

log = logging.getLogger(__name__)


@dataclass
class JobWork:
    """What arrived for one job in a batch (or fell due on a timer)."""

    submitted: bool = False
    cancel_reason: str | None = None
    reports: list[bus_pb2.ChunkReport] = field(default_factory=list)
    retries: list[tuple[int, int]] = field(default_factory=list)  # (idx, attempt) now due
    flush_progress: bool = False
    # From the reconciler: bring the job in line with Postgres after a crash, rebalance or wipe.
    reconcile: bool = False
    expired: list[tuple[int, int, str]] = field(default_factory=list)  # (idx, attempt, worker) lease lost
    deadline: bool = False


# The reports after which an attempt no longer runs.
ATTEMPT_ENDED = frozenset(
    {bus_pb2.CHUNK_SUCCEEDED, bus_pb2.CHUNK_FAILED, bus_pb2.CHUNK_CANCELLED, bus_pb2.CHUNK_RELEASED}
)


@dataclass
class Outbound:
    tasks: list[bus_pb2.ChunkTask] = field(default_factory=list)
    events: list[pb.JobEvent] = field(default_factory=list)
    dead_letters: list[bus_pb2.ChunkReport] = field(default_factory=list)
    controls: list[bus_pb2.JobControl] = field(default_factory=list)
    retry_at: list[tuple[float, uuid.UUID, int, int]] = field(default_factory=list)
    # For metrics, counted after the commit: (kind, state name, seconds since start).
    finished: list[tuple[str, str, float]] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)  # (monotonic, job, idx, attempt)
    # Jobs of the batch this scheduler could not lock at its epoch: another one owns them now.
    fenced: set[uuid.UUID] = field(default_factory=set)


class JobMachine:
    def __init__(self, progress_interval_s: float) -> None:
        self._pacer = ProgressPacer(progress_interval_s)
        self._trackers: dict[uuid.UUID, ProgressTracker] = {}
        # Jobs whose coalesced progress event is held back until this monotonic time.
        self.progress_due: dict[uuid.UUID, float] = {}
        # The newest worker report behind a job's next event: the event carries its time, so the
        # latency a client sees is measured from the worker, not from the scheduler.
        self._report_time: dict[uuid.UUID, Timestamp] = {}
        # Within one batch: the inputs of the jobs it starts, read together up front, and their
        # chunk rows, written together by flush_chunks.
        self._inputs: dict[uuid.UUID, bytes] = {}
        self._new_chunks: list[tuple[uuid.UUID, int, bytes]] = []
        self._counted: dict[uuid.UUID, list[int]] = {}
        self._results: dict[uuid.UUID, list[Any]] = {}

    async def prepare(self, conn: Conn, jobs: list[JobRow], work: dict[uuid.UUID, JobWork]) -> None:
        """Does for the whole batch, one statement each, what would otherwise cost a query per job:
        reads the inputs of the jobs it may start, records the chunk successes of running jobs (a
        success stands whatever else the batch says about the job), and reads the chunk results of
        the jobs those successes complete."""
        starting = [j.id for j in jobs if j.state == JobState.QUEUED and (work[j.id].submitted or work[j.id].reconcile)]
        self._inputs = await store.read_inputs(conn, starting)
        self._new_chunks = []
        successes: dict[tuple[uuid.UUID, int], str] = {}
        for job in jobs:
            if job.state == JobState.RUNNING:
                for r in work[job.id].reports:
                    if r.type == bus_pb2.CHUNK_SUCCEEDED:
                        successes.setdefault((job.id, r.chunk_index), r.result_json.decode() or "null")
        self._counted = await store.record_successes(conn, [(j, i, r) for (j, i), r in successes.items()])
        # The jobs these successes complete: their results are read together for the merge. A job
        # completed some other way this batch (a failure it may survive) reads its own in _succeed.
        completing = [
            j.id
            for j in jobs
            if j.state == JobState.RUNNING
            and j.done_chunks + j.failed_chunks + len(self._counted.get(j.id, ())) >= j.total_chunks
        ]
        self._results = await store.chunk_results(conn, completing)

    async def flush_chunks(self, conn: Conn) -> None:
        """Writes the chunk rows of the jobs started so far; before anything else touches their chunks."""
        if self._new_chunks:
            rows, self._new_chunks = self._new_chunks, []
            await store.insert_chunks(conn, rows)

    async def apply(self, conn: Conn, job: JobRow, work: JobWork, out: Outbound) -> None:
        tracker = self._tracker(job)
        dirty = work.flush_progress
        if work.reconcile:
            await self._reconcile(conn, job, out)
        if work.submitted:
            await self._start(conn, job, out)
        if work.reports:
            dirty |= await self._reports(conn, job, work.reports, out)
        for idx, attempt, worker in work.expired:
            reason = f"worker {worker or '?'} was lost (lease expired)"
            await self._requeue(conn, job, idx, attempt, out, reason, lease_expired=True)
        if work.retries and job.state == JobState.RUNNING:
            await self._dispatch(conn, job, out, only=work.retries)
        if work.deadline and not JobState(job.state).terminal:
            await self._end(conn, job, JobState.FAILED, out, error="the job's deadline passed before it finished")
        if work.cancel_reason is not None and not JobState(job.state).terminal:
            await self._end(conn, job, JobState.CANCELLED, out, message=work.cancel_reason or "cancelled")
        if job.state == JobState.RUNNING and job.done_chunks + job.failed_chunks >= job.total_chunks:
            await self._succeed(conn, job, out)
        if JobState(job.state).terminal:
            self.forget(job.id)
        elif dirty and job.state == JobState.RUNNING:
            self._maybe_progress(job, tracker, out)

    def forget(self, job_id: uuid.UUID) -> None:
        self._trackers.pop(job_id, None)
        self._pacer.forget(job_id)
        self._report_time.pop(job_id, None)
        self.progress_due.pop(job_id, None)

    def _tracker(self, job: JobRow) -> ProgressTracker:
        tracker = self._trackers.get(job.id)
        if tracker is None:
            tracker = self._trackers[job.id] = ProgressTracker(total=job.total_chunks)
        # The row is the truth for counts; the tracker only adds what is not stored (partial chunks).
        tracker.total, tracker.done, tracker.failed = job.total_chunks, job.done_chunks, job.failed_chunks
        tracker.message, tracker.started_at = job.progress_message, job.started_at
        return tracker

    def _event(self, job: JobRow, out: Outbound, type_: pb.EventType.ValueType, **fields: Any) -> pb.JobEvent:
        tracker = self._tracker(job)
        job.last_seq += 1
        job.changed = True
        when = self._report_time.pop(job.id, None) or now_timestamp()
        event = pb.JobEvent(
            job_id=str(job.id),
            seq=job.last_seq,
            type=type_,
            state=pb.JobState.ValueType(job.state),
            progress=tracker.to_proto(time.time()),
            time=when,
            **fields,
        )
        out.events.append(event)
        return event

    async def _reconcile(self, conn: Conn, job: JobRow, out: Outbound) -> None:
        """Postgres says what must happen next; Kafka may have lost any message about it."""
        if JobState(job.state).terminal:
            return
        if job.cancel_requested:
            await self._end(conn, job, JobState.CANCELLED, out, message="cancelled")
        elif job.state == JobState.QUEUED:
            await self._start(conn, job, out)
        else:
            await self._dispatch(conn, job, out, schedule_later=out)

    async def _start(self, conn: Conn, job: JobRow, out: Outbound) -> None:
        if job.state == JobState.RUNNING:
            # A redelivered submit: the split is stored, but its dispatch may not have gone out.
            await self._dispatch(conn, job, out)
            return
        if job.state != JobState.QUEUED:
            return
        if job.cancel_requested:
            await self._end(conn, job, JobState.CANCELLED, out, message="cancelled before it started")
            return
        try:
            kind = get_kind(job.kind)
            payloads = list(kind.split(job.params, self._inputs.pop(job.id, b"")))
        except Exception as err:
            log.warning("job %s: split failed: %s", job.id, err)
            await self._end(conn, job, JobState.FAILED, out, error=f"splitting the job failed: {err}")
            return
        self._new_chunks += [(job.id, idx, payload) for idx, payload in enumerate(payloads)]
        job.state = JobState.RUNNING
        job.total_chunks = len(payloads)
        job.started_at = time.time()
        self._event(job, out, pb.JOB_STARTED, message=f"split into {len(payloads)} chunks")
        self._pacer.started(job.id, time.monotonic())
        params = job.params_json.encode()
        timeout_ms = _timeout_ms(kind, job)
        for idx, payload in enumerate(payloads):
            out.tasks.append(_task(job, kind, idx, 1, payload, params, timeout_ms))

    async def _dispatch(
        self,
        conn: Conn,
        job: JobRow,
        out: Outbound,
        only: list[tuple[int, int]] | None = None,
        schedule_later: Outbound | None = None,
    ) -> None:
        """Publishes the job's pending chunks that are due (or just `only`).

        With `schedule_later`, pending chunks still waiting out a retry backoff get a timer, for a
        scheduler that took the job over and never saw the failures that set those timers.
        """
        kind = get_kind(job.kind)
        params = job.params_json.encode()
        timeout_ms = _timeout_ms(kind, job)
        await self.flush_chunks(conn)
        due, later = await store.pending_chunks(conn, job.id, only)
        for idx, attempt, payload in due:
            out.tasks.append(_task(job, kind, idx, attempt, payload, params, timeout_ms))
        if schedule_later is not None:
            now = time.monotonic()
            for idx, attempt, wait_s in later:
                schedule_later.retry_at.append((now + wait_s, job.id, idx, attempt))

    async def _requeue(
        self,
        conn: Conn,
        job: JobRow,
        idx: int,
        attempt: int,
        out: Outbound,
        reason: str,
        *,
        lease_expired: bool = False,
    ) -> None:
        """Runs a chunk again whose worker is gone or gave it back; not a failure of the chunk."""
        if JobState(job.state).terminal:
            await store.mark_cancelled(conn, job.id, [(idx, attempt)])
            return
        next_attempt = await store.requeue(conn, job.id, idx, attempt, lease_expired=lease_expired)
        if next_attempt is None:
            return  # it finished, or was already run again
        self._tracker(job).chunk_finished(idx)
        self._event(job, out, pb.CHUNK_RETRYING, chunk_index=idx, attempt=next_attempt, message=reason)
        await self._dispatch(conn, job, out, only=[(idx, next_attempt)])

    async def _reports(self, conn: Conn, job: JobRow, reports: list[bus_pb2.ChunkReport], out: Outbound) -> bool:
        """Applies workers' reports; returns whether progress changed."""
        tracker = self._tracker(job)
        changed = False
        # Recorded by prepare(), which ran while the job was running: they count even if the
        # job ended earlier in this batch, so its counters agree with its chunks.
        counted = self._counted.pop(job.id, [])
        if counted:
            for idx in counted:
                tracker.chunk_finished(idx)
            job.done_chunks += len(counted)
            job.changed = True
            changed = True
        if JobState(job.state).terminal:
            await self._stopped_after_end(conn, job, reports)
            return False
        newest = max(reports, key=lambda r: (r.time.seconds, r.time.nanos)).time
        if newest.seconds:
            self._report_time[job.id] = newest
        for n, report in enumerate(reports, start=1):
            if report.type == bus_pb2.CHUNK_PROGRESS:
                tracker.chunk_progress(report.chunk_index, report.fraction)
                if report.message:
                    job.progress_message = report.message
                changed = True
            elif report.type == bus_pb2.CHUNK_FAILED:
                changed |= await self._chunk_failed(conn, job, report, out)
            elif report.type == bus_pb2.CHUNK_CANCELLED:
                await store.mark_cancelled(conn, job.id, [(report.chunk_index, report.attempt)])
            elif report.type == bus_pb2.CHUNK_RELEASED:
                reason = f"worker {report.worker_id} stopped and gave the chunk back"
                await self._requeue(conn, job, report.chunk_index, report.attempt, out, reason)
            if JobState(job.state).terminal:
                await self._stopped_after_end(conn, job, reports[n:])
                return False
        return changed

    async def _stopped_after_end(self, conn: Conn, job: JobRow, reports: list[bus_pb2.ChunkReport]) -> None:
        """Ends the running attempts that reported their end after their job ended.

        The job's outcome is settled, so whatever an attempt says now (it succeeded, failed, stopped
        or gave the chunk back) only means it no longer runs. A chunk whose code finished before the
        cancel reached it would otherwise stay RUNNING, its lease kept alive by its worker, for
        minutes after its job was CANCELLED.
        """
        ended = [(r.chunk_index, r.attempt) for r in reports if r.type in ATTEMPT_ENDED]
        if ended:
            await store.mark_cancelled(conn, job.id, ended)

    async def _chunk_failed(self, conn: Conn, job: JobRow, report: bus_pb2.ChunkReport, out: Outbound) -> bool:
        idx, attempt = report.chunk_index, report.attempt
        failures = await store.running_failures(conn, job.id, idx, attempt)
        if failures is None:
            return False  # a stale attempt, or the chunk already finished
        failures += 1
        policy = retry_policy(get_kind(job.kind), job.options)
        self._tracker(job).chunk_finished(idx)
        error = f"chunk {idx} attempt {attempt}: {report.error}"
        self._event(job, out, pb.CHUNK_FAILED, chunk_index=idx, attempt=attempt, error=report.error)
        if not report.permanent and policy.should_retry(failures):
            delay = policy.delay(failures)
            next_attempt = await store.retry_chunk(conn, job.id, idx, report.error, delay)
            self._event(
                job,
                out,
                pb.CHUNK_RETRYING,
                chunk_index=idx,
                attempt=next_attempt,
                message=f"retrying chunk {idx} in {delay:.1f}s (attempt {next_attempt})",
            )
            out.retry_at.append((time.monotonic() + delay, job.id, idx, next_attempt))
            out.retried.append(job.kind)
            return False
        await store.fail_chunk(conn, job.id, idx, report.error)
        out.dead_letters.append(report)
        out.dead.append(job.kind)
        job.failed_chunks += 1
        job.changed = True
        if not allows_partial(get_kind(job.kind), job.options):
            left = "it cannot succeed" if report.permanent else f"{failures} failed attempts, no retry left"
            await self._end(conn, job, JobState.FAILED, out, error=f"{error} ({left})")
        return True

    async def _succeed(self, conn: Conn, job: JobRow, out: Outbound) -> None:
        try:
            results = self._results.pop(job.id, None)
            if results is None:
                results = (await store.chunk_results(conn, [job.id]))[job.id]
            result = get_kind(job.kind).merge(job.params, results)
        except Exception as err:
            log.warning("job %s: merge failed: %s", job.id, err)
            await self._end(conn, job, JobState.FAILED, out, error=f"merging chunk results failed: {err}")
            return
        job.result = result if isinstance(result, dict) else {"value": result}
        await self._end(conn, job, JobState.SUCCEEDED, out)

    async def _end(
        self, conn: Conn, job: JobRow, state: JobState, out: Outbound, *, message: str = "", error: str = ""
    ) -> None:
        job.state = state
        job.finished = True
        job.error = error
        job.changed = True
        out.finished.append((job.kind, state.name.lower(), time.time() - (job.started_at or time.time())))
        if state != JobState.SUCCEEDED and job.total_chunks:
            await self.flush_chunks(conn)
            await store.mark_cancelled(conn, job.id)
            # Workers stop what still runs of a job that ended without them.
            out.controls.append(bus_pb2.JobControl(job_id=str(job.id), type=bus_pb2.CANCEL, reason=error or message))
        type_ = {
            JobState.SUCCEEDED: pb.JOB_SUCCEEDED,
            JobState.FAILED: pb.JOB_FAILED,
            JobState.CANCELLED: pb.JOB_CANCELLED,
        }[state]
        fields: dict[str, Any] = {"message": message or f"job {state.name.lower()}", "error": error}
        if job.result is not None:
            fields["result"] = to_struct(job.result)
        self._event(job, out, type_, **fields)

    def _maybe_progress(self, job: JobRow, tracker: ProgressTracker, out: Outbound) -> None:
        """Coalesces progress: an event now if the job's pace allows, else one when it does."""
        now = time.monotonic()
        wait_s = self._pacer.spend(job.id, now)
        if wait_s == 0.0:
            self._event(job, out, pb.JOB_PROGRESS, message=tracker.message)
            self.progress_due.pop(job.id, None)
        else:
            self.progress_due.setdefault(job.id, now + wait_s)


def _timeout_ms(kind: JobKind, job: JobRow) -> int:
    return int((chunk_timeout_s(kind, job.options) or 0) * 1000)


def _task(
    job: JobRow, kind: JobKind, idx: int, attempt: int, payload: bytes, params: bytes, timeout_ms: int
) -> bus_pb2.ChunkTask:
    return bus_pb2.ChunkTask(
        job_id=str(job.id),
        tenant_id=job.tenant_id,
        kind=kind.name,
        chunk_index=idx,
        attempt=attempt,
        payload=payload,
        params_json=params,
        timeout_ms=timeout_ms,
        dispatched_at=now_timestamp(),
    )
