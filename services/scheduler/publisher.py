"""Announces what each committed scheduler batch decided, then commits that batch's offsets.

The batch loop hands a batch's messages over and goes on to the next batch while the broker
acknowledges them: waiting for those acknowledgements (and for the offset commit) inside the loop
made every event wait for the batch before it to be announced too. Batches are announced strictly
in the order they were recorded, and a batch's offsets are committed only after all of its messages
were acknowledged, so a crash still replays every batch whose announcement might be lost, and
replaying is harmless (Postgres decides what counts). A bounded queue keeps a slow broker from
letting recorded batches pile up in memory.

Every batch that queued while one was being announced goes out with the next in one send:
announcing them one by one cost a produce round trip each, and under load the queue grew until
events waited there longer than everywhere else together. Offsets are committed at most every
COMMIT_EVERY_S, not after every batch (a commit per batch was a broker request per batch, forty a
second under load): what a crash or a rebalance replays grows by that much, and replaying is
harmless. drain() commits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from jobstream.kafka import Outgoing, retry_broker_errors, send_all
from services.scheduler import metrics

log = logging.getLogger(__name__)

# A 100,000-chunk job's tasks at once outran the broker's request timeout, and retrying them whole
# sent them all again: send in slices, each acknowledged before the next.
PUBLISH_SLICE = 5000
# Recorded batches waiting to be announced before the batch loop waits for the broker.
MAX_PENDING = 8
# How long acknowledged offsets may wait to be committed, by default.
COMMIT_EVERY_S = 0.25


@dataclass
class _Batch:
    messages: list[Outgoing]
    offsets: dict[TopicPartition, int]
    consumer: AIOKafkaConsumer | None
    queued_at: float


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        consumer: Callable[[], AIOKafkaConsumer],
        commit_every_s: float = COMMIT_EVERY_S,
    ) -> None:
        self._producer = producer
        self._consumer = consumer
        self._commit_every_s = commit_every_s
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue(MAX_PENDING)
        # Offsets whose batches were announced and not yet committed, read by that consumer.
        self._acked: dict[TopicPartition, int] = {}
        self._acked_by: AIOKafkaConsumer | None = None
        self._next_commit = 0.0
        self._committing = asyncio.Lock()

    async def put(self, messages: list[Outgoing], offsets: dict[TopicPartition, int] | None = None) -> None:
        """Queues a recorded batch: its messages, then (once they are acknowledged) the next offset
        to read on each partition it came from. Waits while MAX_PENDING batches are queued."""
        if not messages and not offsets:
            return
        consumer = self._consumer() if offsets else None
        await self._queue.put(_Batch(messages, offsets or {}, consumer, time.monotonic()))

    async def drain(self) -> None:
        """Returns once every queued batch is announced and its offsets committed (or refused)."""
        await self._queue.join()
        await self._commit()

    async def run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), self._until_commit())
            except TimeoutError:
                await self._commit()
                continue
            batches = [first]
            while not self._queue.empty():
                batches.append(self._queue.get_nowait())
            try:
                await self._announce(batches)
            finally:
                for _ in batches:
                    self._queue.task_done()

    async def _announce(self, batches: list[_Batch]) -> None:
        """Sends the batches' messages in the order they were recorded, then keeps their offsets for
        the next commit (and makes it, when it is due)."""
        messages = [m for batch in batches for m in batch.messages]
        started = time.monotonic()
        for batch in batches:
            metrics.BATCH_PHASE.labels(phase="queued").observe(started - batch.queued_at)
        for start in range(0, len(messages), PUBLISH_SLICE):
            await self._send(messages[start : start + PUBLISH_SLICE])
        metrics.BATCH_PHASE.labels(phase="publish").observe(time.monotonic() - started)
        metrics.PUBLISHED_BATCHES.observe(len(batches))
        for batch in batches:
            if batch.consumer is None:
                continue
            if batch.consumer is not self._acked_by:
                # The group was joined again (the broker came back empty): offsets read before name
                # positions in topics that no longer exist, and committing them would skip messages.
                self._acked, self._acked_by = {}, batch.consumer
            self._acked.update(batch.offsets)  # later batches read further
        if time.monotonic() >= self._next_commit:
            await self._commit()

    def _until_commit(self) -> float | None:
        return max(0.0, self._next_commit - time.monotonic()) if self._acked else None

    async def _send(self, messages: list[Outgoing]) -> None:
        # Postgres already holds the outcome; only the announcement waits for the broker.
        async def attempt() -> None:
            await asyncio.gather(*await send_all(self._producer, messages))

        await retry_broker_errors(attempt, f"publishing {len(messages)} messages")

    async def _commit(self) -> None:
        async with self._committing:
            consumer = self._consumer()
            acked, self._acked = self._acked, {}
            self._next_commit = time.monotonic() + self._commit_every_s
            if self._acked_by is None or consumer is not self._acked_by:
                return
            owned = consumer.assignment()
            offsets = {tp: offset for tp, offset in acked.items() if tp in owned}
            if not offsets:
                return
            started = time.monotonic()
            try:
                await consumer.commit(offsets)
            except CommitFailedError as err:
                # The partitions moved while we worked; the new owner replays them idempotently.
                log.warning("offset commit refused after a rebalance: %s", err)
            except KafkaError as err:
                # The next commit covers these offsets; a crash before then replays them.
                log.warning("offset commit failed: %s", err)
            metrics.BATCH_PHASE.labels(phase="commit").observe(time.monotonic() - started)
