"""Group commit without a timer: what arrives while a batch runs goes into the next one."""

from __future__ import annotations

import asyncio

import pytest

from jobstream.batching import Coalescer, SharedReads
from tests.helpers import wait_for


class Recorder:
    """A batch function that holds each batch until released, and says when one has started."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(items)
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    async def running(self, count: int) -> None:
        async def started() -> bool:
            return len(self.batches) == count

        await wait_for(started, within=5, what=f"batch {count} to start")


async def _queued(call: Coalescer[int, int], count: int) -> None:
    async def queued() -> bool:
        return call.waiting == count

    await wait_for(queued, within=5, what=f"{count} calls to queue")


async def test_a_lone_call_is_a_batch_of_one_and_waits_for_nothing_else() -> None:
    recorder = Recorder()
    recorder.release.set()
    assert await Coalescer(recorder.run)(4) == 40
    assert recorder.batches == [[4]]


async def test_calls_arriving_during_a_batch_share_the_next_and_each_gets_its_own_outcome() -> None:
    recorder = Recorder()
    call = Coalescer(recorder.run, max_batch=3)
    first = asyncio.create_task(call(0))
    await recorder.running(1)  # the first batch runs, alone
    later = [asyncio.create_task(call(i)) for i in range(1, 6)]
    await _queued(call, 5)
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
    await recorder.running(1)
    gone, stays = asyncio.create_task(call(2)), asyncio.create_task(call(4))
    await _queued(call, 2)
    gone.cancel()
    recorder.release.set()

    assert await stays == 40 and await blocker == 0
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert recorder.batches == [[0], [2, 4]]  # the departed call's item was still processed


class Reads:
    def __init__(self) -> None:
        self.keys: list[str] = []
        self.release = asyncio.Event()

    async def read(self, key: str) -> str:
        self.keys.append(key)
        await self.release.wait()
        if key == "bad":
            raise LookupError(key)
        return key.upper()


async def test_concurrent_reads_of_one_key_share_one_read_and_other_keys_read_apart() -> None:
    reads = Reads()
    shared = SharedReads(reads.read)
    calls = [asyncio.create_task(shared(key)) for key in ("a", "a", "b", "a")]

    async def both_started() -> bool:
        return len(reads.keys) == 2

    await wait_for(both_started, within=5, what="the two reads to start")
    reads.release.set()

    assert await asyncio.gather(*calls) == ["A", "A", "B", "A"]
    assert reads.keys == ["a", "b"]
    assert await shared("a") == "A" and reads.keys == ["a", "b", "a"]  # a finished read is not reused


async def test_a_caller_that_leaves_does_not_cancel_the_read_the_others_wait_for() -> None:
    reads = Reads()
    shared = SharedReads(reads.read)
    leaving, staying = asyncio.create_task(shared("a")), asyncio.create_task(shared("a"))

    async def started() -> bool:
        return reads.keys == ["a"]

    await wait_for(started, within=5, what="the read to start")
    leaving.cancel()
    reads.release.set()

    assert await staying == "A"
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_a_failed_read_fails_every_caller_that_shared_it() -> None:
    reads = Reads()
    reads.release.set()
    shared = SharedReads(reads.read)
    results = await asyncio.gather(shared("bad"), shared("bad"), return_exceptions=True)
    assert [type(r) for r in results] == [LookupError, LookupError] and reads.keys == ["bad"]
