"""Publishes the outbox to Kafka: what Submit and Cancel committed reaches the broker eventually.

Rows are taken with SKIP LOCKED, so several gateways relay side by side without sending a row
twice at once, and deleted only in the transaction that saw Kafka acknowledge them: a crash or a
broker outage leaves them for the next round. A consumer may still see a message twice; every
consumer is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from psycopg_pool import AsyncConnectionPool

from jobstream.config import Settings
from jobstream.db import DATABASE_UNAVAILABLE
from jobstream.kafka import send_all
from jobstream.topics import partition_of
from services.gateway.metrics import OUTBOX_BACKLOG

log = logging.getLogger(__name__)

BATCH = 1000
IDLE_POLL_SECONDS = 1.0


class OutboxRelay:
    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool,
        producer: AIOKafkaProducer,
        idle_poll_s: float = IDLE_POLL_SECONDS,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._producer = producer
        self._idle_poll_s = idle_poll_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called after a commit that wrote to the outbox, so it goes out now, not at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            # Cleared before the round, not after: a commit that wakes us while a round is under
            # way is then seen, instead of waiting out the idle poll (it held Submits up to 1 s).
            self._wake.clear()
            try:
                sent = await self.relay_once()
                backoff = 0.1
            except (TimeoutError, KafkaError, OSError, *DATABASE_UNAVAILABLE) as err:
                # Rows stay in the outbox until a round that reached both sends them.
                log.warning("outbox relay: %s (%s); retrying in %.1fs", _which(err), err, backoff)
                sent = 0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            if sent == BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle_poll_s)

    async def track_backlog(self, every_s: float = 5.0) -> None:
        while True:
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute("SELECT count(*) FROM outbox")
                    row = await cur.fetchone()
                OUTBOX_BACKLOG.set(row[0] if row else 0)
            except Exception as err:
                log.warning("counting the outbox failed: %s", err)
            await asyncio.sleep(every_s)

    async def relay_once(self) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM outbox WHERE id IN"
                " (SELECT id FROM outbox ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING id, topic, key, value",
                (BATCH,),
            )
            rows = sorted(await cur.fetchall())
            if not rows:
                return 0
            # Every message is keyed by a job id on a job-keyed topic. The partition is named here:
            # Submit hashed the id moments ago (partition_of remembers it), while the producer's
            # partitioner would hash it again in pure Python.
            partitions = self._settings.job_partitions
            messages = [
                (self._settings.topic(topic), partition_of(key.decode(), partitions), key, bytes(value))
                for _, topic, key, value in rows
            ]
            futures = await send_all(self._producer, messages)
            await asyncio.wait_for(asyncio.gather(*futures), timeout=15)
        return len(rows)


def _which(err: BaseException) -> str:
    return "Postgres unavailable" if isinstance(err, DATABASE_UNAVAILABLE) else "broker unavailable"
