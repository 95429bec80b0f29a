"""A chunk run on its own: it waits for a slot, and only a run that ended on its own tells the
worker how long its chunks take (see services/worker/window.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from jobstream.bus.v1 import bus_pb2
from jobstream.kinds import get_kind, load_kinds
from services.worker.runner import ChunkRun


def _run(ms: int, slots: asyncio.Semaphore, reports: list[bus_pb2.ChunkReport]) -> ChunkRun:
    load_kinds()
    params = get_kind("demo.sleep").params.validate({"chunks": 1, "ms": ms})
    task = bus_pb2.ChunkTask(
        job_id="00000000-0000-0000-0000-000000000001",
        kind="demo.sleep",
        chunk_index=0,
        attempt=1,
        params_json=json.dumps(params).encode(),
    )

    async def report(sent: bus_pb2.ChunkReport) -> None:
        reports.append(sent)

    return ChunkRun(task, "w", report, slots)


class _Slots(asyncio.Semaphore):
    """The worker's slots, telling the test when a run asks for one and when it got it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.asked = asyncio.Event()
        self.taken = asyncio.Event()

    async def acquire(self) -> Literal[True]:
        self.asked.set()
        got = await super().acquire()
        self.taken.set()
        return got


async def _holding_a_slot(slots: _Slots, reports: list[bus_pb2.ChunkReport]) -> tuple[ChunkRun, asyncio.Task[None]]:
    """A minute-long run, started, once it has taken its slot; and its task."""
    run = _run(60_000, slots, reports)
    run.asyncio_task = task = asyncio.create_task(run.run())
    await asyncio.wait_for(slots.taken.wait(), 5)
    return run, task


async def test_a_run_that_ends_on_its_own_tells_how_long_it_ran() -> None:
    reports: list[bus_pb2.ChunkReport] = []
    run = _run(0, _Slots(), reports)
    await asyncio.wait_for(run.run(), 5)
    assert run.ran_s is not None
    assert [r.type for r in reports] == [bus_pb2.CHUNK_SUCCEEDED]
    assert run.outcome is reports[-1]  # kept, to be sent again while the scheduler has not recorded it


async def test_a_run_cut_short_by_cancel_tells_nothing_of_how_long_chunks_take() -> None:
    reports: list[bus_pb2.ChunkReport] = []
    run, task = await _holding_a_slot(_Slots(), reports)
    run.cancel()
    await asyncio.wait_for(task, 5)
    assert run.ran_s is None
    assert reports[-1].type == bus_pb2.CHUNK_CANCELLED
    assert run.outcome is reports[-1]


async def test_a_run_the_worker_abandons_has_no_outcome_to_send_again() -> None:
    reports: list[bus_pb2.ChunkReport] = []
    run, task = await _holding_a_slot(_Slots(), reports)
    run.abandon()
    await asyncio.gather(task, return_exceptions=True)
    assert run.outcome is None and all(r.type == bus_pb2.CHUNK_PROGRESS for r in reports)


async def test_a_chunk_waiting_for_a_slot_is_cancelled_without_running() -> None:
    reports: list[bus_pb2.ChunkReport] = []
    slots = _Slots()
    busy, busy_task = await _holding_a_slot(slots, reports)
    slots.asked.clear()
    waiting = _run(0, slots, reports)
    waiting.asyncio_task = asyncio.create_task(waiting.run())
    await asyncio.wait_for(slots.asked.wait(), 5)
    waiting.cancel()
    await asyncio.wait_for(waiting.asyncio_task, 5)
    assert not waiting.started and waiting.ran_s is None
    assert [r.type for r in reports] == [bus_pb2.CHUNK_CANCELLED]
    busy.abandon()
    await asyncio.gather(busy_task, return_exceptions=True)


async def test_a_run_cancelled_before_its_task_first_ran_reports_the_stop() -> None:
    # A cancel can land between the worker creating a chunk's task and the task's first step;
    # cancelling the task then would end it before run() begins, and nothing would tell the
    # scheduler that the chunk stopped.
    reports: list[bus_pb2.ChunkReport] = []
    slots = _Slots()
    run = _run(60_000, slots, reports)
    run.asyncio_task = asyncio.create_task(run.run())
    run.cancel()
    await asyncio.wait_for(run.asyncio_task, 5)
    assert not slots.asked.is_set() and not run.started and run.ran_s is None
    assert [r.type for r in reports] == [bus_pb2.CHUNK_CANCELLED]
