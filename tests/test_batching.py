"""Group commit without a timer: what arrives while a batch runs goes into the next one."""

from __future__ import annotations

import asyncio

import pytest

from jobstream.batching import Coalescer


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(items)
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_a_lone_call_is_a_batch_of_one_and_waits_for_nothing_else() -> None:
    recorder = Recorder()
    recorder.release.set()
    assert await Coalescer(recorder.run)(4) == 40
    assert recorder.batches == [[4]]


async def test_calls_arriving_during_a_batch_share_the_next_and_each_gets_its_own_outcome() -> None:
    recorder = Recorder()
    call = Coalescer(recorder.run, max_batch=3)
    first = asyncio.create_task(call(0))
    await asyncio.sleep(0)  # the first batch is now running, alone
    later = [asyncio.create_task(call(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    recorder.release.set()

    assert await first == 0
    outcomes = await asyncio.gather(*later, return_exceptions=True)

    assert recorder.batches == [[0], [1, 2, 3], [4, 5]]
    assert [o if isinstance(o, int) else str(o) for o in outcomes] == ["odd 1", 20, "odd 3", 40, "odd 5"]


async def test_a_batch_that_fails_whole_fails_each_call_with_its_error() -> None:
    async def broken(items: list[int]) -> list[int | Exception]:
        raise ConnectionError("database unreachable")

    call = Coalescer(broken)
    results = await asyncio.gather(call(1), call(2), return_exceptions=True)
    assert [str(r) for r in results] == ["database unreachable", "database unreachable"]


async def test_a_caller_that_goes_away_does_not_disturb_the_others() -> None:
    recorder = Recorder()
    call = Coalescer(recorder.run)
    blocker = asyncio.create_task(call(0))
    await asyncio.sleep(0)
    gone, stays = asyncio.create_task(call(2)), asyncio.create_task(call(4))
    await asyncio.sleep(0)
    gone.cancel()
    recorder.release.set()

    assert await stays == 40 and await blocker == 0
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert recorder.batches == [[0], [2, 4]]  # the departed call's item was still processed
