"""Announces what each committed scheduler batch decided, then commits that batch's offsets.

The batch loop hands a batch's messages over and goes on to the next batch while the broker
acknowledges them: waiting for those acknowledgements (and for the offset commit) inside the loop
made every event wait for the batch before it to be announced too. Batches are announced strictly
in the order they were recorded, and a batch's offsets are committed only after all of its messages
were acknowledged, so a crash still replays every batch whose announcement might be lost, and
replaying is harmless (Postgres decides what counts). A bounded queue keeps a slow broker from
letting recorded batches pile up in memory.
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


@dataclass
class _Batch:
    messages: list[Outgoing]
    offsets: dict[TopicPartition, int]
    consumer: AIOKafkaConsumer | None


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, consumer: Callable[[], AIOKafkaConsumer]) -> None:
        self._producer = producer
        self._consumer = consumer
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue(MAX_PENDING)

    async def put(self, messages: list[Outgoing], offsets: dict[TopicPartition, int] | None = None) -> None:
        """Queues a recorded batch: its messages, then (once they are acknowledged) the next offset
        to read on each partition it came from. Waits while MAX_PENDING batches are queued."""
        if not messages and not offsets:
            return
        consumer = self._consumer() if offsets else None
        await self._queue.put(_Batch(messages, offsets or {}, consumer))

    async def drain(self) -> None:
        """Returns once every queued batch is announced and its offsets committed (or refused)."""
        await self._queue.join()

    async def run(self) -> None:
        while True:
            batch = await self._queue.get()
            try:
                started = time.monotonic()
                for start in range(0, len(batch.messages), PUBLISH_SLICE):
                    await self._send(batch.messages[start : start + PUBLISH_SLICE])
                metrics.BATCH_PHASE.labels(phase="publish").observe(time.monotonic() - started)
                if batch.offsets:
                    started = time.monotonic()
                    await self._commit(batch)
                    metrics.BATCH_PHASE.labels(phase="commit").observe(time.monotonic() - started)
            finally:
                self._queue.task_done()

    async def _send(self, messages: list[Outgoing]) -> None:
        # Postgres already holds the outcome; only the announcement waits for the broker.
        async def attempt() -> None:
            await asyncio.gather(*await send_all(self._producer, messages))

        await retry_broker_errors(attempt, f"publishing {len(messages)} messages")

    async def _commit(self, batch: _Batch) -> None:
        consumer = self._consumer()
        if batch.consumer is None or consumer is not batch.consumer:
            # The group was joined again (the broker came back empty): these offsets name
            # positions in topics that no longer exist, and committing them would skip messages.
            return
        owned = consumer.assignment()
        offsets = {tp: offset for tp, offset in batch.offsets.items() if tp in owned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except CommitFailedError as err:
            # The partitions moved while we worked; the new owner replays them idempotently.
            log.warning("offset commit refused after a rebalance: %s", err)
        except KafkaError as err:
            # The next batch's commit covers these offsets; a crash before then replays them.
            log.warning("offset commit failed: %s", err)
