"""Which finished chunks a heartbeat sends the report of again, and when it tries again (services.worker.worker)."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from jobstream import topics
from jobstream.bus.v1 import bus_pb2
from jobstream.config import Settings
from jobstream.embedded.broker import EmbeddedBroker
from jobstream.topics import ensure_topics
from services.worker.claims import ChunkKey
from services.worker.worker import Reported, Worker, reports_to_resend
from tests.helpers import wait_for

NOW = 100.0


def _reported(resend_at: float) -> Reported:
    return Reported(at=0.0, lease_until=0.0, report=b"", resend_at=resend_at, resend_every=20.0)


def test_a_finished_chunk_still_held_past_its_resend_time_is_resent() -> None:
    key = ("job", 0)
    assert reports_to_resend([key], {key}, {}, {key: _reported(NOW)}, NOW) == [key]


def test_a_chunk_recorded_meanwhile_or_not_yet_due_is_not_resent() -> None:
    recorded, early = ("job", 0), ("job", 1)
    reported = {recorded: _reported(NOW - 1), early: _reported(NOW + 1)}
    assert reports_to_resend([recorded, early], {early}, {}, reported, NOW) == []


def test_a_chunk_running_again_here_is_not_resent() -> None:
    # The same worker claimed the chunk's next attempt: its old report says nothing now.
    key = ("job", 0)
    assert reports_to_resend([key], {key}, {key: object()}, {key: _reported(NOW - 1)}, NOW) == []


def test_a_chunk_that_ended_unreported_during_the_beat_is_skipped() -> None:
    # It was running when the beat began and ended without a report (abandoned, or its report
    # never went out): there is nothing to send, and the beat must not fail on it.
    key = ("job", 0)
    assert reports_to_resend([key], {key}, {}, {}, NOW) == []


def _job_not_on_partition_0(partitions: int) -> str:
    return next(j for j in (str(uuid.uuid4()) for _ in range(100)) if topics.partition_of(j, partitions) != 0)


def _worker_holding(settings: Settings, producer: AIOKafkaProducer, job_id: str) -> tuple[Worker, ChunkKey]:
    """A worker (no claims, no group) holding chunk 0 of `job_id` finished here and unrecorded,
    its report due now and every 20 s after."""
    worker = Worker(settings, pool=None, member=None, producer=producer)  # type: ignore[arg-type]
    key = (job_id, 0)
    report = bus_pb2.ChunkReport(job_id=job_id, chunk_index=0, attempt=1, type=bus_pb2.CHUNK_SUCCEEDED)
    worker._reported[key] = Reported(0.0, 0.0, report.SerializeToString(), resend_at=NOW, resend_every=20.0)
    return worker, key


def _schedule(worker: Worker, key: ChunkKey) -> tuple[float, float]:
    """When the report goes out again, and the wait after that."""
    reported = worker._reported[key]
    return reported.resend_at, reported.resend_every


async def test_a_resend_the_producer_refuses_is_tried_again_at_the_next_beat_then_put_off(
    broker: EmbeddedBroker, admin: AIOKafkaAdminClient, producer: AIOKafkaProducer
) -> None:
    # A broker that came back empty lists jobs.progress with the count a producer's send
    # re-created it with, until the scheduler re-creates it: the resend is refused meanwhile.
    settings = Settings(kafka_bootstrap=broker.bootstrap, job_partitions=12)
    await admin.create_topics([NewTopic(settings.topic(topics.PROGRESS), 1, 1)])
    worker, key = _worker_holding(settings, producer, _job_not_on_partition_0(settings.job_partitions))

    await worker._resend_reports([key], NOW)
    assert _schedule(worker, key) == (NOW, 20.0)

    # As the scheduler does on such a broker (a producer's metadata request may re-create the
    # topic at the broker's default count meanwhile; ensure_topics deletes that one too).
    await ensure_topics(settings)

    async def resent() -> bool:
        await worker._resend_reports([key], NOW)
        return _schedule(worker, key)[0] > NOW

    await wait_for(resent, within=15, what="the resend to go out once the topic has its partitions")
    assert _schedule(worker, key) == (NOW + 20.0, 40.0)


async def test_a_resend_to_a_broker_that_does_not_answer_gives_the_heartbeat_back(
    broker: EmbeddedBroker, producer: AIOKafkaProducer
) -> None:
    # The producer would wait its whole request timeout (15 s, longer than a lease) for metadata
    # of a topic it has not seen; the beats that keep the leases come from the same loop.
    settings = Settings(kafka_bootstrap=broker.bootstrap, job_partitions=12, heartbeat_seconds=0.5)
    worker, key = _worker_holding(settings, producer, str(uuid.uuid4()))
    broker.kill()

    await asyncio.wait_for(worker._resend_reports([key], NOW), 5)

    assert _schedule(worker, key) == (NOW, 20.0)
