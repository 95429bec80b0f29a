"""The walking skeleton end to end: real gRPC, real broker, real Postgres, real worker processes."""

from __future__ import annotations

import asyncio
import collections
import random
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from jobstream.events import from_struct
from jobstream.v1 import jobstream_pb2 as pb
from tests.conftest import WORKERS

if TYPE_CHECKING:
    from tests.helpers import Client
from tests.helpers import (
    assert_contiguous,
    metric,
    params,
    probes,
    read_rest,
    submit,
    wait_for,
    watch_all,
    watch_until,
)
from tests.stack import Stack

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[tuple[Any, ...]]


async def test_watch_sees_queued_running_progress_succeeded(client: Client) -> None:
    # More chunks than the 3 workers have slots (24), so the job runs in waves and some chunks finish
    # while others wait: a job that ends within one progress interval has no progress event.
    job = await submit(client, "demo.sleep", chunks=60, ms=150)
    assert job.state == pb.QUEUED and job.id

    events = await watch_all(client, job.id)

    assert_contiguous(events)
    types = [e.type for e in events]
    assert types[0] == pb.JOB_QUEUED and events[0].state == pb.QUEUED
    assert pb.JOB_STARTED in types and pb.JOB_PROGRESS in types
    assert any(e.state == pb.RUNNING for e in events)
    assert types[-1] == pb.JOB_SUCCEEDED and events[-1].state == pb.SUCCEEDED
    done = [e.progress.done_chunks for e in events]
    assert done == sorted(done), f"done_chunks went down: {done}"
    assert done[-1] == 60 and events[-1].progress.total_chunks == 60
    assert dict(events[-1].result) == {"chunks": 60}

    final = await client.GetJob(pb.GetJobRequest(job_id=job.id))
    assert final.state == pb.SUCCEEDED
    assert final.last_seq == events[-1].seq
    assert final.progress.done_chunks == 60 and final.progress.percent == 100
    assert dict(final.result) == {"chunks": 60}
    assert final.finished_at.seconds > 0 and final.started_at.seconds > 0


async def test_concurrent_watchers_see_identical_sequences(client: Client) -> None:
    job = await submit(client, "demo.sleep", chunks=12, ms=100)

    first, second = await asyncio.gather(watch_all(client, job.id), watch_all(client, job.id))

    assert_contiguous(first)
    assert [e.SerializeToString() for e in first] == [e.SerializeToString() for e in second]
    replay = await watch_all(client, job.id)
    assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in first]
    k = len(first) // 2
    resumed = await watch_all(client, job.id, after_seq=k)
    assert [e.seq for e in resumed] == [e.seq for e in first[k:]]
    assert [e.SerializeToString() for e in resumed] == [e.SerializeToString() for e in first[k:]]
    assert await watch_all(client, job.id, after_seq=first[-1].seq) == []


async def test_watch_resumes_live_after_seq_without_gap(client: Client) -> None:
    job = await submit(client, "demo.sleep", chunks=10, ms=300)
    stream, seen = await watch_until(client, job.id, lambda e: e.type == pb.JOB_STARTED)
    stream.cancel()

    rest = await watch_all(client, job.id, after_seq=seen[-1].seq)

    assert_contiguous(seen + rest)


async def test_the_gateway_reads_only_the_updates_partitions_its_streams_need(stack: Stack, client: Client) -> None:
    """No stream open, no partition of jobs.updates read. A Watch on a job whose partition nobody
    read still gets its events live from Kafka, not only from Postgres, and without a gap; once it
    ended, the partition goes unread again."""

    async def partitions_read() -> float:
        return await metric(stack, "gateway", "jobstream_watch_partitions_read")

    async def none_read() -> bool:
        return await partitions_read() == 0

    await wait_for(none_read, within=15, what="the gateway to read no updates partition while no stream is open")
    live_before = await metric(stack, "gateway", "jobstream_event_latency_seconds_count")
    job = await submit(client, "demo.sleep", chunks=48, ms=300)  # two waves over the workers' 24 slots

    stream, seen = await watch_until(client, job.id, lambda e: e.type == pb.JOB_STARTED)
    assert await partitions_read() == 1
    rest = await read_rest(stream, job.id)

    events = seen + rest
    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED
    live = await metric(stack, "gateway", "jobstream_event_latency_seconds_count") - live_before
    assert live >= 2, f"only {live} of {len(events)} events came live from the updates feed"
    await wait_for(none_read, within=15, what="the gateway to stop reading the partition once the stream ended")


async def test_a_worker_reads_the_cancel_feed_only_while_it_has_chunks(stack: Stack, client: Client, db: Db) -> None:
    """Idle workers fetch nothing from jobs.control. The worker that claims a chunk reads every
    partition of it from then on, so a Cancel reaches the running chunk; idle again, it stops."""
    workers = stack.workers()
    assert len(workers) == WORKERS

    async def reading() -> list[float]:
        return [await metric(stack, w, "jobstream_worker_cancel_feed_partitions_read") for w in workers]

    async def all_ready() -> bool:
        return all(status == 200 for status, _ in (await probes(stack, "/readyz", workers)).values())

    async def none_reading() -> bool:
        return not any(await reading())

    async def one_running() -> bool:
        return sum([await metric(stack, w, "jobstream_worker_chunks_in_flight") for w in workers]) == 1

    await wait_for(all_ready, what="every worker to be ready")
    await wait_for(none_reading, within=15, what="idle workers to read no partition of jobs.control")
    job = await submit(client, "demo.sleep", chunks=1, ms=120_000)
    await wait_for(one_running, what="the job's one chunk to run")
    assert sorted(await reading()) == [0] * (WORKERS - 1) + [stack.settings.job_partitions]

    await client.Cancel(pb.CancelRequest(job_id=job.id, reason="test says stop"))
    events = await watch_all(client, job.id)
    assert events[-1].type == pb.JOB_CANCELLED
    await wait_for(lambda: _none_running(db, job.id), what="the running chunk to stop")
    await wait_for(none_reading, within=15, what="the worker to stop reading jobs.control once idle")


async def test_every_worker_runs_some_chunks(client: Client, db: Db) -> None:
    job = await submit(client, "demo.sleep", chunks=60, ms=100)

    events = await watch_all(client, job.id)

    assert events[-1].type == pb.JOB_SUCCEEDED
    cur = await db.execute("SELECT worker_id, count(*) FROM chunks WHERE job_id = %s GROUP BY worker_id", (job.id,))
    per_worker: dict[str, int] = dict(await cur.fetchall())
    assert len(per_worker) == WORKERS, f"chunks per worker: {per_worker}"
    assert sum(per_worker.values()) == 60


async def test_cancel_stops_the_job_and_no_chunk_starts_after(client: Client, db: Db) -> None:
    job = await submit(client, "demo.sleep", chunks=100, ms=500)
    stream, events = await watch_until(client, job.id, lambda e: e.progress.done_chunks >= 10)

    cancelled = await client.Cancel(pb.CancelRequest(job_id=job.id, reason="test says stop"))
    claimed_at_cancel = await _claimed(db, job.id)
    events += await read_rest(stream, job.id)

    assert cancelled.job.cancel_requested
    assert_contiguous(events)
    assert events[-1].type == pb.JOB_CANCELLED and events[-1].state == pb.CANCELLED
    final = await client.GetJob(pb.GetJobRequest(job_id=job.id))
    assert final.state == pb.CANCELLED
    # The workers' claims are the record of every chunk that started: none was added after Cancel returned.
    await wait_for(lambda: _none_running(db, job.id), what="running chunks to stop")
    assert await _claimed(db, job.id) == claimed_at_cancel
    assert len(claimed_at_cancel) < 100
    cur = await db.execute("SELECT count(*) FROM chunks WHERE job_id = %s AND state = 2", (job.id,))
    row = await cur.fetchone()
    assert row is not None and row[0] < 100


async def test_cancel_of_finished_job_changes_nothing(client: Client, db: Db) -> None:
    job = await submit(client, "demo.sleep", chunks=2, ms=0)
    events = await watch_all(client, job.id)
    before = await client.GetJob(pb.GetJobRequest(job_id=job.id))

    response = await client.Cancel(pb.CancelRequest(job_id=job.id))

    assert events[-1].type == pb.JOB_SUCCEEDED
    assert response.job == before
    assert await client.GetJob(pb.GetJobRequest(job_id=job.id)) == before
    cur = await db.execute("SELECT cancel_requested_at FROM jobs WHERE id = %s", (job.id,))
    assert await cur.fetchone() == (None,)


async def test_wordcount_equals_a_single_pass(client: Client) -> None:
    rng = random.Random(7)
    vocabulary = [f"w{n}" for n in range(3000)] + ["straße", "ÉTÉ", "naïve", "日本語"]
    lines = [" ".join(rng.choices(vocabulary, k=rng.randint(0, 30))) for _ in range(60_000)]
    text = "\n".join(lines) + "\n"
    data = text.encode()
    assert len(data) > 3_000_000

    job = await submit(client, "text.wordcount", data=data, chunk_bytes=256 * 1024, top=25)
    events = await watch_all(client, job.id, within=120)

    assert events[-1].type == pb.JOB_SUCCEEDED, events[-1].error
    expected = collections.Counter(re.findall(r"\w+", text.casefold()))
    result = from_struct((await client.GetJob(pb.GetJobRequest(job_id=job.id))).result)
    assert result["words"] == sum(expected.values())
    assert result["lines"] == len(text.splitlines())
    assert result["unique_words"] == len(expected)
    top = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
    assert [(t["word"], t["count"]) for t in result["top"]] == top
    assert events[-1].progress.total_chunks > 10


async def test_jobs_finishing_together_each_merge_their_own_chunks(client: Client) -> None:
    # Jobs that complete in the same scheduler batch have their chunk results read together:
    # each must get its own, in its own chunk order.
    texts = ["".join(f"word{n} shared{m}\n" for m in range(n + 150)) for n in range(24)]
    jobs = await asyncio.gather(*(submit(client, "text.wordcount", data=t.encode(), chunk_bytes=1024) for t in texts))
    finals = await asyncio.gather(*(watch_all(client, job.id, within=60) for job in jobs))

    for job, text, events in zip(jobs, texts, finals, strict=True):
        assert events[-1].type == pb.JOB_SUCCEEDED, events[-1].error
        assert events[-1].progress.total_chunks > 1
        result = from_struct((await client.GetJob(pb.GetJobRequest(job_id=job.id))).result)
        assert result["words"] == len(text.split())
        assert result["unique_words"] == len(set(text.split()))


@pytest.mark.parametrize(
    ("kind", "values", "field"),
    [
        ("no.such.kind", {}, "kind"),
        ("", {}, "kind"),
        ("demo.sleep", {"chunks": "abc"}, "chunks"),
        ("demo.sleep", {"chunks": 2.5}, "chunks"),
        ("demo.sleep", {"chunks": 0}, "chunks"),
        ("demo.sleep", {"surprise": 1}, "surprise"),
    ],
)
async def test_bad_submit_is_invalid_argument_and_writes_nothing(
    client: Client, db: Db, kind: str, values: dict[str, Any], field: str
) -> None:
    before = await _count(db, "jobs"), await _count(db, "job_events")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.Submit(pb.SubmitRequest(kind=kind, params=params(**values)))

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    assert (await _count(db, "jobs"), await _count(db, "job_events")) == before


async def test_unknown_job_is_not_found_and_malformed_id_invalid(client: Client, db: Db) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    before = await _count(db, "jobs"), await _count(db, "job_events")
    calls: list[Callable[[str], Awaitable[object]]] = [
        lambda job_id: client.GetJob(pb.GetJobRequest(job_id=job_id)),
        lambda job_id: client.Cancel(pb.CancelRequest(job_id=job_id)),
        lambda job_id: watch_all(client, job_id),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(missing)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call("not-a-job")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _count(db, "jobs"), await _count(db, "job_events")) == before


async def test_list_jobs_newest_first_in_pages(client: Client) -> None:
    ids = [(await submit(client, "demo.sleep", chunks=1, ms=0)).id for _ in range(5)]

    first = await client.ListJobs(pb.ListJobsRequest(page_size=3, kind="demo.sleep"))
    second = await client.ListJobs(pb.ListJobsRequest(page_size=3, kind="demo.sleep", page_token=first.next_page_token))

    listed = [j.id for j in first.jobs] + [j.id for j in second.jobs]
    assert listed[:5] == ids[::-1]
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ListJobs(pb.ListJobsRequest(page_size=5000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.ListJobs(pb.ListJobsRequest(page_token="garbage!"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _claimed(db: Db, job_id: str) -> set[int]:
    cur = await db.execute("SELECT idx FROM chunks WHERE job_id = %s AND claimed_at IS NOT NULL", (job_id,))
    return {row[0] for row in await cur.fetchall()}


async def _none_running(db: Db, job_id: str) -> bool:
    cur = await db.execute("SELECT count(*) FROM chunks WHERE job_id = %s AND state = 1", (job_id,))
    row = await cur.fetchone()
    return row is not None and row[0] == 0


async def _count(db: Db, table: str) -> int:
    cur = await db.execute(f"SELECT count(*) FROM {table}")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])
