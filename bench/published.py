"""When the scheduler published each event: the record timestamps of the updates topic.

An event's latency is the sum of two legs with different causes: from the worker's report to the
scheduler publishing the event (the report's trip through the broker, the scheduler's batch and
its Postgres transaction), and from there to the Watch client (the broker again, the gateway's
feed and the stream). A record's timestamp is the scheduler's clock when it handed the event to
its producer, so on one box it splits the two. The topic is read after the run, so the reading
does not load the run it explains.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from jobstream import topics
from jobstream.config import Settings
from jobstream.kafka import make_broadcast_consumer
from jobstream.v1 import jobstream_pb2 as pb

EventKey = tuple[str, int]  # (job id, seq)


class Published:
    """`async with Published(settings) as published:` marks the updates topic's end; after the run,
    `await published.read()` returns when the scheduler handed each event the run published to its
    producer."""

    def __init__(self, settings: Settings) -> None:
        self._topic = settings.topic(topics.UPDATES)
        self._consumer: AIOKafkaConsumer = make_broadcast_consumer(settings)
        self._start: dict[TopicPartition, int] = {}

    async def __aenter__(self) -> Published:
        await self._consumer.start()
        try:
            partitions = sorted(self._consumer.partitions_for_topic(self._topic) or ())
            tps = [TopicPartition(self._topic, p) for p in partitions]
            if not tps:
                raise RuntimeError(f"topic {self._topic} has no partitions")
            # Offsets only, no assignment: an assigned consumer would fetch while the run goes on.
            self._start = await self._consumer.end_offsets(tps)
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def read(self, within: float = 30) -> dict[EventKey, float]:
        """Wall time (seconds) the scheduler handed each event published since entering to its producer."""
        end = await self._consumer.end_offsets(list(self._start))
        behind = {tp for tp in self._start if end[tp] > self._start[tp]}
        self._consumer.assign(list(behind))
        for tp in behind:
            self._consumer.seek(tp, self._start[tp])
        published: dict[EventKey, float] = {}
        deadline = time.monotonic() + within
        while behind:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self._topic}: {len(behind)} partitions not read to their end within {within}s")
            batch = await self._consumer.getmany(*behind, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.value is not None:
                        event = pb.JobEvent.FromString(record.value)
                        published[(event.job_id, event.seq)] = record.timestamp / 1000
                if await self._consumer.position(tp) >= end[tp]:
                    behind.discard(tp)
        return published


def split_at_publish(
    seen: Mapping[EventKey, tuple[float, float]], published: Mapping[EventKey, float]
) -> tuple[list[float], list[float]]:
    """For each event seen (its time and its arrival at the client, wall seconds) that was also
    published: seconds until it was published, and seconds from then to its arrival.

    Record timestamps are whole milliseconds, cut down: the first leg reads up to 1 ms short and
    the second up to 1 ms long.
    """
    until: list[float] = []
    since: list[float] = []
    for key, (event_time, arrival) in seen.items():
        sent = published.get(key)
        if sent is not None:
            until.append(sent - event_time)
            since.append(arrival - sent)
    return until, since
