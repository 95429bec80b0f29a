"""What the end-to-end tests share: submitting, watching to the end, and waiting for a condition."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from jobstream import api_keys
from jobstream.events import is_terminal
from jobstream.v1 import jobstream_pb2 as pb
from tests.stack import REPO, Stack

if TYPE_CHECKING:
    from jobstream.v1.jobstream_pb2_grpc import JobServiceAsyncStub as Client

__all__ = [
    "Client",
    "assert_contiguous",
    "count_jobs",
    "http_get",
    "metric",
    "new_tenant",
    "params",
    "probes",
    "read_partition",
    "read_rest",
    "run_cli",
    "scrape",
    "submit",
    "wait_for",
    "watch_all",
    "watch_until",
]

TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def params(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def new_tenant(db: psycopg.AsyncConnection[Any], name: str) -> tuple[str, str]:
    """A tenant of its own (a fresh id, so tests never share one) and a token of one of its keys."""
    tenant = f"{name}-{uuid.uuid4().hex[:8]}"
    await api_keys.create_tenant(db, tenant)
    return tenant, (await api_keys.create_key(db, tenant, name=f"test {name}")).token


async def run_cli(stack: Stack, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """The jobstream CLI as a user runs it, a process of its own, pointed at the stack's gateway
    and database; it gets an API key only from `args` (or a dev-token file under `cwd`)."""
    env = {**os.environ, "JOBSTREAM_DATABASE_URL": stack.database_url, "PYTHONPATH": str(REPO)}
    env.pop("JOBSTREAM_TOKEN", None)
    argv = [sys.executable, "-m", "jobstream.cli.main", "--gateway", stack.gateway_addr, *args]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False
    )


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a local HTTP endpoint (a service's metrics and health); status 0 when
    nothing answers."""
    # Longer than the 5 s a service gives its readiness checks.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, f"no answer: {err}"


async def probes(stack: Stack, path: str, services: Iterable[str] | None = None) -> dict[str, tuple[int, str]]:
    """What each service (every one, or those named) answers on `path` of its metrics port, asked
    all at once."""
    names = sorted(stack.metrics_ports if services is None else services)
    answers = await asyncio.gather(*(asyncio.to_thread(http_get, stack.metrics_ports[n], path) for n in names))
    return dict(zip(names, answers, strict=True))


async def scrape(stack: Stack, service: str) -> str:
    """A service's /metrics page."""
    status, body = await asyncio.to_thread(http_get, stack.metrics_ports[service], "/metrics")
    assert status == 200, body
    return body


async def metric(stack: Stack, service: str, sample: str) -> float:
    """The sum of a service's samples of that name (every label set), 0 when it has none."""
    text = await scrape(stack, service)
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == sample)


async def submit(client: Client, kind: str, data: bytes = b"", **values: Any) -> pb.Job:
    response = await client.Submit(pb.SubmitRequest(kind=kind, params=params(**values), input=data))
    return response.job


async def watch_all(client: Client, job_id: str, after_seq: int = 0, within: float = 60) -> list[pb.JobEvent]:
    """Every event the stream delivers until it ends (it ends after the terminal event)."""

    async def collect() -> list[pb.JobEvent]:
        return [event async for event in client.Watch(pb.WatchRequest(job_id=job_id, after_seq=after_seq))]

    return await asyncio.wait_for(collect(), within)


async def watch_until(
    client: Client, job_id: str, until: Callable[[pb.JobEvent], bool], within: float = 60
) -> tuple[grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.JobEvent], list[pb.JobEvent]]:
    """Watches from the start until `until` holds for an event; returns the open stream (to read the
    rest from with `read_rest`) and the events so far."""
    stream = client.Watch(pb.WatchRequest(job_id=job_id))
    events: list[pb.JobEvent] = []

    async def collect() -> None:
        async for event in stream:
            events.append(event)
            if until(event):
                return
        raise AssertionError(f"job {job_id}: the stream ended before the awaited event; saw {_types(events)}")

    try:
        await asyncio.wait_for(collect(), within)
    except TimeoutError:
        stream.cancel()
        raise AssertionError(f"job {job_id}: awaited event not seen within {within}s; saw {_types(events)}") from None
    return stream, events


async def read_rest(
    stream: grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.JobEvent], job_id: str, within: float = 60
) -> list[pb.JobEvent]:
    """The rest of an open stream, up to its end (after the terminal event)."""
    events: list[pb.JobEvent] = []

    async def collect() -> None:
        async for event in stream:
            events.append(event)

    try:
        await asyncio.wait_for(collect(), within)
    except TimeoutError:
        stream.cancel()
        raise AssertionError(f"job {job_id}: stream did not end within {within}s; then saw {_types(events)}") from None
    return events


def _types(events: list[pb.JobEvent]) -> list[str]:
    return [pb.EventType.Name(e.type) for e in events]


async def count_jobs(db: psycopg.AsyncConnection[Any]) -> int:
    """Every job row: what a refused Submit must leave unchanged."""
    cur = await db.execute("SELECT count(*) FROM jobs")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float = 30, what: str = "condition") -> None:
    """Polls `condition` until it holds; fails with `what` after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def read_partition(bootstrap: str, topic: str, partition: int, count: int, within: float = 10) -> list[bytes]:
    """The first `count` values of one partition, read from its start by a consumer of its own;
    fails with what it did read after `within` seconds."""
    tp = TopicPartition(topic, partition)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=50)
    await reader.start()
    values: list[bytes] = []
    try:
        reader.assign([tp])
        await reader.seek_to_beginning(tp)

        async def read_enough() -> None:
            while len(values) < count:
                batch = await reader.getmany(tp, timeout_ms=1000)
                values.extend(bytes(r.value or b"") for r in batch.get(tp, []))

        await asyncio.wait_for(read_enough(), within)
    except TimeoutError:
        raise AssertionError(f"read {values} from {topic}[{partition}], expected {count} values") from None
    finally:
        await reader.stop()
    return values


def assert_contiguous(events: list[pb.JobEvent], first: int = 1) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(first, first + len(seqs))), f"seqs not contiguous: {seqs}"
    assert events and is_terminal(events[-1]), "stream did not end with the terminal event"
    assert not any(is_terminal(e) for e in events[:-1]), "an event followed the terminal event"
