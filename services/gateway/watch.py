"""Watch: replay a job's events from Postgres, then follow them live from Kafka, with no gap.

One UpdatesHub per gateway reads jobs.updates and hands each event to the streams watching that
job. It reads only the partitions its streams need: a partition is read from its end once a stream
of one of its jobs opens, before that stream reads Postgres, and left unread again once no stream
has needed it for a while. A gateway nobody watches through then costs the broker and itself no
fetches, and each gateway's reading follows its own streams.

A stream never trusts Kafka alone: events are delivered strictly by seq, and whenever the live
feed skips a seq (a message lost between the scheduler's commit and its publish, a slow client
whose buffer overflowed, a hub that started after the event) the stream reads the missing events
from Postgres, the source of truth. A background check compares each stream with the job's
last_seq in Postgres, so even a lost final event reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from jobstream import topics
from jobstream.batching import SharedReads
from jobstream.config import Settings
from jobstream.events import is_terminal
from jobstream.kafka import (
    assign_all_unread,
    decode,
    follow_partition_changes,
    make_broadcast_consumer,
    partitions_read,
    read_from_end,
)
from jobstream.observability import kafka_ready
from jobstream.service import essential
from jobstream.v1 import jobstream_pb2 as pb
from services.gateway.metrics import EVENT_LATENCY, WATCH_PARTITIONS_READ, WATCH_STREAMS
from services.gateway.store import EVENTS_PAGE, JobStore

log = logging.getLogger(__name__)

# A stream that falls this far behind stops buffering and catches up from Postgres instead.
MAX_BUFFERED = 256
CHECK_INTERVAL_SECONDS = 1.0
CHECK_BATCH = 1000
# How long a new stream waits for its partition to be read from now on before it reads Postgres
# regardless (a broker that does not answer): it then follows the job through the check above.
FOLLOW_TIMEOUT_SECONDS = 2.0


class Subscription:
    __slots__ = ("buffer", "job_id", "last_delivery", "last_seq", "need_db", "ready")

    def __init__(self, job_id: str, after_seq: int) -> None:
        self.job_id = job_id
        self.last_seq = after_seq
        self.last_delivery = time.monotonic()
        self.buffer: deque[pb.JobEvent] = deque()
        self.need_db = True
        self.ready = asyncio.Event()

    def push(self, event: pb.JobEvent) -> None:
        if event.seq <= self.last_seq:
            return
        if len(self.buffer) >= MAX_BUFFERED:
            self.buffer.clear()
            self.need_db = True
        else:
            self.buffer.append(event)
        self.ready.set()

    def nudge(self) -> None:
        self.need_db = True
        self.ready.set()


class UpdatesHub:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self._settings = settings
        self._store = store
        self._subs: dict[str, set[Subscription]] = {}
        self._consumer = make_broadcast_consumer(settings)
        self._topic = settings.topic(topics.UPDATES)
        self._tasks: list[asyncio.Task[None]] = []
        # Streams of one job that fell behind together read the missed events once.
        self._reads: SharedReads[tuple[uuid.UUID, int], list[pb.JobEvent]] = SharedReads(self._read_stored)
        # Streams opening together on an unread partition start reading it once, from one offset.
        self._starts: SharedReads[TopicPartition, None] = SharedReads(lambda tp: read_from_end(self._consumer, tp))
        self._unwatched: set[TopicPartition] = set()
        WATCH_STREAMS.set_function(lambda: self.open_streams)
        WATCH_PARTITIONS_READ.set_function(lambda: len(partitions_read(self._consumer)))

    @property
    def open_streams(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def start(self) -> None:
        await self._consumer.start()
        await assign_all_unread(self._consumer, self._topic)
        self._tasks = [
            essential(self._follow(), "updates feed"),
            essential(self._check_behind(), "watch check"),
            essential(follow_partition_changes(self._consumer, self._topic), "updates partition watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._consumer.stop()

    async def kafka_ready(self) -> str | None:
        return await kafka_ready(self._consumer)

    async def events_after(self, job_id: uuid.UUID, after_seq: int) -> list[pb.JobEvent]:
        """The job's stored events after `after_seq` (a page of them)."""
        return await self._reads((job_id, after_seq))

    async def _read_stored(self, key: tuple[uuid.UUID, int]) -> list[pb.JobEvent]:
        return [pb.JobEvent.FromString(raw) for raw in await self._store.events_after(*key)]

    def subscribe(self, job_id: str, after_seq: int) -> Subscription:
        sub = Subscription(job_id, after_seq)
        self._subs.setdefault(job_id, set()).add(sub)
        return sub

    async def follow(self, job_id: str) -> None:
        """Returns once the job's partition is read from an offset no later than now, so whatever
        the stream reads from Postgres after this, the feed brings every event published since."""
        tp = TopicPartition(self._topic, topics.partition_of(job_id, self._settings.job_partitions))
        if tp not in self._consumer.paused():
            return
        try:
            await asyncio.wait_for(self._starts(tp), FOLLOW_TIMEOUT_SECONDS)
        except (KafkaError, TimeoutError) as err:
            log.warning("reading %s for a Watch of job %s failed (%r); the stream follows Postgres", tp, job_id, err)

    def _stop_reading_unwatched(self) -> None:
        """Pauses the partitions no stream has needed at two checks in a row: a partition whose
        jobs are watched one after another is not dropped and sought again between them."""
        watched = {topics.partition_of(job_id, self._settings.job_partitions) for job_id in self._subs}
        unwatched = {tp for tp in partitions_read(self._consumer) if tp.partition not in watched}
        idle = unwatched & self._unwatched
        if idle:
            self._consumer.pause(*idle)
        self._unwatched = unwatched - idle

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job_id]

    async def _follow(self) -> None:
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=1000, max_records=5000)
            except KafkaError as err:
                log.warning("updates feed interrupted (%s); streams fall back to Postgres", err)
                await asyncio.sleep(1)
                continue
            for records in batch.values():
                for record in records:
                    subs = self._subs.get(record.key.decode()) if record.key else None
                    if not subs:
                        continue
                    event = decode(pb.JobEvent, record)
                    if event is None:
                        continue  # the stream reads the event it misses from Postgres
                    for sub in subs:
                        sub.push(event)

    async def _check_behind(self) -> None:
        """Nudges streams that Postgres says are behind and that heard nothing for a while."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)
            self._stop_reading_unwatched()
            job_ids = list(self._subs)
            for start in range(0, len(job_ids), CHECK_BATCH):
                batch = [uuid.UUID(j) for j in job_ids[start : start + CHECK_BATCH]]
                try:
                    last = await self._store.last_seqs(batch)
                except Exception as err:
                    log.warning("watch check against Postgres failed: %s", err)
                    break
                quiet_since = time.monotonic() - CHECK_INTERVAL_SECONDS
                for job_id, last_seq in last.items():
                    for sub in self._subs.get(job_id, ()):
                        if sub.last_seq < last_seq and sub.last_delivery < quiet_since:
                            sub.nudge()


async def watch_events(hub: UpdatesHub, job_id: uuid.UUID, after_seq: int) -> AsyncIterator[pb.JobEvent]:
    """Yields the job's events after `after_seq` in seq order, ending after the terminal event."""
    sub = hub.subscribe(str(job_id), after_seq)
    try:
        await hub.follow(sub.job_id)
        while True:
            if sub.need_db:
                sub.need_db = False
                while True:
                    stored = await hub.events_after(job_id, sub.last_seq)
                    for event in stored:
                        yield _delivered(sub, event)
                        if is_terminal(event):
                            return
                    if len(stored) < EVENTS_PAGE:
                        break
            while sub.buffer:
                event = sub.buffer.popleft()
                if event.seq <= sub.last_seq:
                    continue
                if event.seq != sub.last_seq + 1:
                    sub.buffer.appendleft(event)
                    sub.need_db = True
                    break
                EVENT_LATENCY.observe(max(0.0, time.time() - event.time.ToMicroseconds() / 1e6))
                yield _delivered(sub, event)
                if is_terminal(event):
                    return
            if not sub.buffer and not sub.need_db:
                sub.ready.clear()
                await sub.ready.wait()
    finally:
        hub.unsubscribe(sub)


def _delivered(sub: Subscription, event: pb.JobEvent) -> pb.JobEvent:
    sub.last_seq = event.seq
    sub.last_delivery = time.monotonic()
    return event
