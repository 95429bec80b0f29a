"""The embedded Postgres and broker launchers, against the real binaries."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.records_to_delete import RecordsToDelete
from aiokafka.errors import KafkaConnectionError

from jobstream.embedded.broker import EmbeddedBroker
from jobstream.embedded.postgres import RUN_AS_USER, EmbeddedPostgres, PostgresStartError
from jobstream.embedded.procs import ChildProcess
from jobstream.embedded.stack import LocalStack


def _tree(pid: int) -> list[int]:
    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_postgres_serves_the_jobstream_database_over_tcp(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg", durable=False) as pg:
        url = pg.start()
        assert url == f"postgresql://postgres@127.0.0.1:{pg.port}/jobstream"
        with psycopg.connect(url) as conn:
            assert conn.execute("select 1, current_database()").fetchone() == (1, "jobstream")


def test_postgres_keeps_committed_data_across_sigkill_and_stale_lock(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", durable=True)
    url = pg.start()
    try:
        with psycopg.connect(url) as conn:
            conn.execute("create table survivors (name text)")
            conn.execute("insert into survivors values ('before the crash')")
        old_pids = _tree(pg.pid or 0)
        pg.kill()
        assert _wait_gone(old_pids) == []
        assert (tmp_path / "pg" / "postmaster.pid").exists()  # left behind by the crash

        assert pg.start() == url  # same port, same data
        with psycopg.connect(url) as conn:
            assert conn.execute("select name from survivors").fetchall() == [("before the crash",)]
    finally:
        pg.stop()


def test_postgres_starts_over_a_lock_whose_pid_was_reused(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", durable=False)
    pg.start()
    pg.kill()
    # A live process of the server's own user now holds the dead postmaster's pid: postgres alone
    # would take it for a running server and refuse to start.
    user = RUN_AS_USER if os.geteuid() == 0 else None
    squatter = ChildProcess("sleep", ["sleep", "30"], log_path=tmp_path / "sleep.log", user=user)
    squatter.start()
    try:
        lock = tmp_path / "pg" / "postmaster.pid"
        lines = lock.read_text().split("\n")
        lock.write_text("\n".join([str(squatter.pid), *lines[1:]]))
        url = pg.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        squatter.kill()
        pg.stop()


def test_postgres_refuses_a_second_server_on_the_same_data(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg", durable=False) as first:
        second = EmbeddedPostgres(tmp_path / "pg", durable=False)
        with pytest.raises(PostgresStartError, match="already running"):
            second.start()
        assert first.alive


def test_postgres_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", durable=False)
    pg.start()
    pids = _tree(pg.pid or 0)
    assert len(pids) > 1  # the postmaster and its helpers
    pg.stop()
    pg.stop()  # idempotent
    assert pg.pid is None
    assert _wait_gone(pids, timeout=0.5) == []


async def test_broker_round_trips_a_message(broker: EmbeddedBroker) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("embedded.roundtrip", num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait("embedded.roundtrip", b"hello", key=b"job-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition("embedded.roundtrip", sent.partition)])
        await consumer.seek_to_beginning()
        message = await consumer.getone()
    finally:
        await consumer.stop()
    assert (message.key, message.value) == (b"job-1", b"hello")


async def test_broker_keeps_every_batch_it_was_asked_to_delete(
    broker: EmbeddedBroker, admin: AIOKafkaAdminClient, producer: AIOKafkaProducer
) -> None:
    """The embedded broker cannot trim a partition: it refuses DeleteRecords by closing the
    connection, and a consumer still reads from offset 0. Its fetches cost more the more batches a
    partition holds (docs/capacity.md), so a broker that starts trimming should make this fail,
    and the capacity notes change with it."""
    topic = TopicPartition("embedded.undeletable", 0)
    await admin.create_topics([NewTopic(topic.topic, num_partitions=1, replication_factor=1)])
    for value in (b"a", b"b", b"c"):  # one batch each
        await producer.send_and_wait(topic.topic, value, partition=0)
    with pytest.raises(KafkaConnectionError):
        await admin.delete_records({topic: RecordsToDelete(2)}, timeout_ms=5000)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([topic])
        await consumer.seek_to_beginning(topic)
        first = await asyncio.wait_for(consumer.getone(), 10)
    finally:
        await consumer.stop()
    assert (first.offset, first.value) == (0, b"a")


async def test_broker_restart_comes_back_empty_on_the_same_port(broker: EmbeddedBroker) -> None:
    bootstrap = broker.bootstrap
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("embedded.wiped", num_partitions=1, replication_factor=1)])
        assert "embedded.wiped" in await admin.list_topics()
    finally:
        await admin.close()
    # A connected client does not slow the restart down (a graceful stop would wait for it).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        old_pid = broker.pid
        started = time.monotonic()
        broker.restart()
        assert time.monotonic() - started < 2
    finally:
        await producer.stop()
    assert broker.bootstrap == bootstrap
    assert broker.pid != old_pid
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert "embedded.wiped" not in await admin.list_topics()
    finally:
        await admin.close()


def test_broker_stop_and_kill_leave_no_process_behind(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path)
    broker.start()
    first = broker.pid or 0
    broker.kill()
    assert _wait_gone([first], timeout=0.5) == []
    broker.start()
    second = broker.pid or 0
    broker.stop()
    broker.stop()
    assert broker.pid is None
    assert _wait_gone([second], timeout=0.5) == []


def test_children_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from jobstream.embedded.broker import EmbeddedBroker
        from jobstream.embedded.postgres import EmbeddedPostgres
        pg = EmbeddedPostgres(Path({str(tmp_path / "pg")!r}), durable=False)
        pg.start()
        broker = EmbeddedBroker(Path({str(tmp_path)!r}))
        broker.start()
        print(pg.pid, broker.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(word) for word in parent.stdout.readline().split()]
        assert len(pids) == 2
        tree = [pid for root in pids for pid in _tree(root)]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(tree) == []
    finally:
        parent.kill()
        parent.wait()


def test_stack_settings_are_what_its_services_run_with(tmp_path: Path) -> None:
    """The stack makes the topics from its settings, so they must carry the services' overrides:
    topics of 12 partitions under services hashing jobs onto 6 would strand half the jobs."""
    stack = LocalStack(tmp_path, env_overrides={"JOBSTREAM_JOB_PARTITIONS": "6", "JOBSTREAM_CHUNK_PARTITIONS": "10"})
    settings = stack.settings
    assert (settings.job_partitions, settings.chunk_partitions) == (6, 10)
    assert settings.kafka_bootstrap == stack.broker.bootstrap
    assert settings.kafka_leave_group is False
