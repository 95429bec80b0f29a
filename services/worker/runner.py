"""Runs one claimed chunk: the kind's code under a timeout, interruptible by cancel, and reports it.

Whatever the kind does (raises, hangs past its timeout, returns something that is not JSON), the
outcome is a report about this chunk; it never takes the worker down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from jobstream.bus.v1 import bus_pb2
from jobstream.errors import ChunkError
from jobstream.events import dumps, now_timestamp
from jobstream.kinds import get_kind
from services.worker.metrics import CHUNK_DURATION

log = logging.getLogger(__name__)

Report = Callable[[bus_pb2.ChunkReport], Awaitable[None]]

# Progress within a chunk is sent at most this often; a chunk shorter than this sends none, its
# completion says it all. The scheduler coalesces again per job.
PROGRESS_EVERY_SECONDS = 0.1
MAX_RESULT_BYTES = 4 * 1024 * 1024
# The reports that end an attempt. The worker keeps the one it sent, to send it again while the
# scheduler has not recorded it (see services.worker.worker.reports_to_resend).
ENDING_REPORTS = frozenset({bus_pb2.CHUNK_SUCCEEDED, bus_pb2.CHUNK_FAILED, bus_pb2.CHUNK_CANCELLED})


class Stop(Exception):
    """Why a running chunk was interrupted."""


class ChunkView:
    """The ChunkContext a kind's code is handed: this chunk's identity, a copy of its job's params,
    progress reports for this chunk and nothing else. No pool, producer, worker or other chunk is
    reachable through it, so a kind cannot touch another job's data by way of its context.

    (Code in the worker process is trusted code an operator installed; this keeps honest code
    honest, it is not a sandbox against hostile code.)
    """

    __slots__ = ("_run", "attempt", "chunk_index", "job_id", "params")

    def __init__(self, run: ChunkRun) -> None:
        self._run = run
        self.job_id = run.job_id
        self.chunk_index = run.chunk_index
        self.attempt = run.attempt
        self.params: Mapping[str, Any] = MappingProxyType(json.loads(run.task.params_json or b"{}"))

    @property
    def cancelled(self) -> bool:
        return self._run.cancelled

    async def report(self, fraction: float, message: str = "") -> None:
        await self._run.report(fraction, message)


class ChunkRun:
    """One attempt of one chunk on this worker."""

    def __init__(self, task: bus_pb2.ChunkTask, worker_id: str, report: Report, slots: asyncio.Semaphore) -> None:
        self.task = task
        self.job_id = task.job_id
        self.chunk_index = task.chunk_index
        self.attempt = task.attempt
        self._worker_id = worker_id
        self._report = report
        self._slots = slots
        self._cancelled = False
        # Claimed chunks wait for one of the worker's slots; until then the kind's code has not run.
        self.started = False
        # Whether run() has begun: a task cancelled before its first step never enters run(), so
        # it could not report the stop.
        self._begun = False
        # How long the kind's code ran, once it ended on its own: a run cut short by Cancel or a
        # stopping worker says nothing about how long the kind's chunks take.
        self.ran_s: float | None = None
        self._last_progress = time.monotonic()
        self.asyncio_task: asyncio.Task[None] | None = None
        # The monotonic time until which the stored lease lasts, at least (the worker keeps it).
        self.lease_until = 0.0
        # The report that ended this attempt, once it was handed to the broker.
        self.outcome: bus_pb2.ChunkReport | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.chunk_index)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """The job was cancelled (or ended): interrupt the kind's code at its next await, or, if
        the run has not begun, have it report the stop instead of running."""
        self._cancelled = True
        if self.asyncio_task is not None and self._begun:
            self.asyncio_task.cancel()

    def abandon(self) -> None:
        """Stop without reporting an outcome: the worker is leaving, or lost the lease."""
        if self.asyncio_task is not None:
            self.asyncio_task.cancel()

    async def report(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_EVERY_SECONDS:
            return
        self._last_progress = now
        await self._send(bus_pb2.CHUNK_PROGRESS, fraction=fraction, message=message)

    async def _send(self, type_: bus_pb2.ReportType.ValueType, **fields: Any) -> None:
        report = bus_pb2.ChunkReport(
            job_id=self.job_id,
            chunk_index=self.chunk_index,
            attempt=self.attempt,
            type=type_,
            worker_id=self._worker_id,
            time=now_timestamp(),
            **fields,
        )
        await self._report(report)
        if type_ in ENDING_REPORTS:
            self.outcome = report

    async def run(self) -> None:
        self._begun = True
        if self._cancelled:
            await self._report_cancelled()
            return
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            if not self._cancelled:
                raise  # the worker is stopping, and hands the chunk back
            await self._report_cancelled()
            return
        self.started = True
        self._last_progress = time.monotonic()
        started = time.perf_counter()
        outcome = "failed"
        try:
            outcome = await self._run()
        except asyncio.CancelledError:
            outcome = "stopped"
            raise
        finally:
            self._slots.release()
            elapsed = time.perf_counter() - started
            if outcome in ("succeeded", "failed"):
                self.ran_s = elapsed
            CHUNK_DURATION.labels(kind=self.task.kind, outcome=outcome).observe(elapsed)

    async def _run(self) -> str:
        try:
            result_json = await self._execute()
        except asyncio.CancelledError:
            if not self._cancelled:
                raise  # the worker itself is stopping; it decides what to report
            await self._report_cancelled()
            return "cancelled"
        except ChunkError as err:
            await self._fail(str(err), permanent=not err.retryable)
            return "failed"
        except TimeoutError:
            await self._fail(f"timed out after {self.task.timeout_ms / 1000:g}s")
            return "failed"
        except Exception as err:
            log.warning("job %s chunk %d attempt %d raised %r", self.job_id, self.chunk_index, self.attempt, err)
            await self._fail(f"{type(err).__name__}: {err}")
            return "failed"
        await self._send(bus_pb2.CHUNK_SUCCEEDED, result_json=result_json)
        return "succeeded"

    async def _execute(self) -> bytes:
        kind = get_kind(self.task.kind)
        work = kind.run(ChunkView(self), self.task.payload)
        if self.task.timeout_ms:
            result = await asyncio.wait_for(work, self.task.timeout_ms / 1000)
        else:
            result = await work
        try:
            encoded = dumps(result).encode()
        except (TypeError, ValueError) as err:
            # Running it again would return the same thing: fail the chunk for good.
            raise ChunkError(f"the chunk's result is not JSON-serialisable: {err}", retryable=False) from None
        if len(encoded) > MAX_RESULT_BYTES:
            raise ChunkError(
                f"the chunk's result is {len(encoded)} bytes; at most {MAX_RESULT_BYTES} are allowed", retryable=False
            )
        return encoded

    async def _report_cancelled(self) -> None:
        await self._send(bus_pb2.CHUNK_CANCELLED, message="cancelled")

    async def _fail(self, error: str, *, permanent: bool = False) -> None:
        log.info("job %s chunk %d attempt %d failed: %s", self.job_id, self.chunk_index, self.attempt, error)
        await self._send(bus_pb2.CHUNK_FAILED, error=error, permanent=permanent)

    async def release(self) -> None:
        """Hands the chunk back so another worker runs it at once; it does not count as a failure."""
        await self._send(bus_pb2.CHUNK_RELEASED, message="worker stopping")
