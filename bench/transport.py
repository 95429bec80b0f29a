"""Scenario 2: the transport's own limit. aiokafka produces as many messages as scenario 1 runs
chunks, of the size of a real chunk task, through a topic with as many partitions as jobs.chunks,
configured as the services configure their clients; a reader in another process (as the workers
are) consumes them. Also runnable as `python -m bench.transport READY OUT BOOTSTRAP TOPIC COUNT`,
the reader's side."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run
from jobstream import topics
from jobstream.bus.v1 import bus_pb2
from jobstream.config import Settings
from jobstream.embedded.procs import ChildProcess
from jobstream.embedded.stack import REPO
from jobstream.kafka import make_broadcast_consumer, make_producer


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    key, value = await _sample_chunk_task(stack.settings)
    count = sizes.jobs * sizes.chunks_per_job
    runs = []
    for _ in range(repeat):
        rate = await _one(stack, count, key, value)
        runs.append({"msgs_per_s": rate, "message_bytes": float(len(key) + len(value))})
    return runs


async def _sample_chunk_task(settings: Settings) -> tuple[bytes, bytes]:
    """A chunk task the scheduler published (scenario 1 left plenty), else one built like it."""
    consumer = make_broadcast_consumer(settings)
    await consumer.start()
    try:
        topic = settings.topic(topics.CHUNKS)
        tps = [TopicPartition(topic, p) for p in range(settings.chunk_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        batch = await consumer.getmany(timeout_ms=2000, max_records=1)
        for records in batch.values():
            for record in records:
                return bytes(record.key or b""), bytes(record.value or b"")
    finally:
        await consumer.stop()
    job_id = str(uuid.uuid4())
    params = (
        b'{"chunks":500,"crash_attempt":1,"crash_chunk":-1,"fail_attempts":0,"fail_chunks":"","hang_chunk":-1,"ms":0}'
    )
    task = bus_pb2.ChunkTask(
        job_id=job_id, tenant_id="default", kind="demo.sleep", chunk_index=123, attempt=1, params_json=params
    )
    return f"{job_id}/123/1".encode(), task.SerializeToString()


async def _one(stack: BenchStack, count: int, key: bytes, value: bytes) -> float:
    settings = stack.settings
    topic = f"bench.transport.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=settings.chunk_partitions, replication_factor=1)])
    finally:
        await admin.close()
    work = stack.root / "transport" / topic
    work.mkdir(parents=True)
    ready, out = work / "ready", work / "out.json"
    argv = [sys.executable, "-m", "bench.transport", str(ready), str(out), settings.kafka_bootstrap, topic, str(count)]
    reader = ChildProcess("transport-reader", argv, log_path=work / "reader.log", cwd=REPO)
    reader.start()
    try:
        await _wait_file(ready, reader)
        producer = make_producer(settings)
        await producer.start()
        try:
            started = time.time()
            sent = [await producer.send(topic, value=value, key=key) for _ in range(count)]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        await _wait_file(out, reader)
        last = float(json.loads(out.read_text())["last"])
    finally:
        reader.terminate(5)
    return count / (last - started)


async def _wait_file(path: Path, reader: ChildProcess, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(path.exists):
        if not reader.alive or time.monotonic() > deadline:
            raise RuntimeError(f"transport reader gave no {path.name}:\n{reader.log_tail()}")
        await asyncio.sleep(0.01)


async def _read(ready: Path, out: Path, bootstrap: str, topic: str, count: int) -> None:
    consumer = make_broadcast_consumer(Settings(kafka_bootstrap=bootstrap))
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        await asyncio.to_thread(ready.touch)
        seen = 0
        while seen < count:
            batch = await consumer.getmany(timeout_ms=200)
            seen += sum(len(records) for records in batch.values())
        done = json.dumps({"last": time.time(), "seen": seen})
        # Written whole under another name, then renamed: the waiting side polls for the name and
        # would otherwise read a file that exists but is still empty.
        partial = out.with_name(out.name + ".partial")
        await asyncio.to_thread(partial.write_text, done)
        await asyncio.to_thread(partial.replace, out)
    finally:
        await consumer.stop()


if __name__ == "__main__":
    ready_path, out_path, bootstrap_, topic_, count_ = sys.argv[1:6]
    asyncio.run(_read(Path(ready_path), Path(out_path), bootstrap_, topic_, int(count_)))
