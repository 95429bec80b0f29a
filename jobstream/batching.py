"""Coalescing concurrent calls into batches, so a round trip and a commit are shared by every call
that arrived while the previous batch was in flight.

Under light load each call is a batch of one and waits for nothing extra; under heavy load batches
grow with the load, and the per-call cost of Postgres round trips shrinks exactly when it matters.
This is group commit: no timer, no fixed batch window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# One outcome per item, in order: a result, or the error that item alone gets.
RunBatch = Callable[[list[T]], Awaitable[list["R | Exception"]]]


class Coalescer(Generic[T, R]):
    def __init__(self, run_batch: RunBatch[T, R], max_batch: int = 500) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Calls queued for the next batch."""
        return len(self._queue)

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                outcomes = await self._run_batch([item for item, _ in batch])
            except Exception as err:  # the whole batch failed (Postgres unreachable): every call says so
                outcomes = [err] * len(batch)
            except BaseException:
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the caller went away; its item was still processed
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


K = TypeVar("K")


class SharedReads(Generic[K, R]):
    """Concurrent reads of the same key share one: the first caller starts it, the others await
    its result. Many clients that fell behind together (every Watch stream of a job missing the
    same event) then cost one query, not one each.

    A caller that goes away does not cancel the read the others wait for.
    """

    def __init__(self, read: Callable[[K], Awaitable[R]]) -> None:
        self._read = read
        self._in_flight: dict[K, asyncio.Future[R]] = {}

    async def __call__(self, key: K) -> R:
        shared = self._in_flight.get(key)
        if shared is None:
            shared = self._in_flight[key] = asyncio.ensure_future(self._read(key))
            shared.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(shared)

    def _finished(self, key: K, done: asyncio.Future[R]) -> None:
        del self._in_flight[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so a read whose callers all left is not reported as lost
