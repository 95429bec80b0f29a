"""A kind that raises, returns what JSON cannot hold or returns too much fails its chunk with a clear
error; the worker that ran it lives on and runs the next job."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from google.protobuf import json_format

from jobstream.states import ChunkState
from jobstream.v1 import jobstream_pb2 as pb
from tests.conftest import running_stack
from tests.helpers import params, read_rest, wait_for, watch_all, watch_until
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[tuple[Any, ...]]


@pytest.fixture(scope="module")
async def own(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path_factory.mktemp("misbehaving"), workers=1, JOBSTREAM_KIND_MODULES="tests.misbehaving_kinds"
    ) as stack:
        yield stack


@pytest.mark.parametrize(
    ("how", "error", "attempts"),
    [
        ("raise", "RuntimeError: the kind's own bug", 2),  # may be passing: retried
        ("unserialisable", "the chunk's result is not JSON-serialisable", 1),  # would be again: not retried
        ("oversized", "at most 4194304 are allowed", 1),
    ],
)
async def test_a_misbehaving_chunk_fails_with_a_clear_error_and_the_worker_lives_on(
    own: Stack, own_client: Client, how: str, error: str, attempts: int
) -> None:
    worker = own.services["worker-1"]
    pid = worker.pid

    job = (await own_client.Submit(pb.SubmitRequest(kind="test.misbehave", params=params(how=how)))).job
    events = await watch_all(own_client, job.id)

    failures = [e for e in events if e.type == pb.CHUNK_FAILED]
    assert [e.attempt for e in failures] == list(range(1, attempts + 1)), failures
    assert all(error in e.error for e in failures), [e.error for e in failures]
    assert events[-1].type == pb.JOB_FAILED and error in events[-1].error
    assert worker.alive and worker.pid == pid
    ok = (await own_client.Submit(pb.SubmitRequest(kind="test.misbehave", params=params(how="ok")))).job
    assert (await watch_all(own_client, ok.id))[-1].type == pb.JOB_SUCCEEDED


async def test_a_chunk_reaches_its_own_identity_params_and_progress_only(own_client: Client) -> None:
    job = (await own_client.Submit(pb.SubmitRequest(kind="test.misbehave", params=params(how="snoop")))).job
    events = await watch_all(own_client, job.id)

    assert events[-1].type == pb.JOB_SUCCEEDED, events[-1]
    (seen,) = json_format.MessageToDict(events[-1].result)["chunks"]
    assert seen["members"] == ["attempt", "cancelled", "chunk_index", "job_id", "params", "report"]
    # Held directly: the view's class, the chunk's own run (for cancel and report), its ids and its
    # params; no pool, producer or worker. (In-process code can dig further; the view is a boundary
    # for honest code, not a sandbox.)
    assert set(seen["referents"]) <= {"type", "ChunkRun", "str", "int", "mappingproxy"}, seen["referents"]


async def test_a_chunk_that_returns_after_its_job_was_cancelled_does_not_stay_running(
    own_client: Client, own_db: Db, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    how = params(how="finish_despite_cancel", release=str(release))
    request = pb.SubmitRequest(kind="test.misbehave", params=how)
    job = (await own_client.Submit(request)).job
    stream, events = await watch_until(own_client, job.id, lambda e: e.type == pb.JOB_PROGRESS)

    await own_client.Cancel(pb.CancelRequest(job_id=job.id, reason="test says stop"))
    events += await read_rest(stream, job.id)
    assert events[-1].type == pb.JOB_CANCELLED
    release.touch()  # only now does the chunk's code return its result: a success after the job ended

    # The chunk's code returned a result instead of stopping, and its worker reported a success
    # for a job already cancelled: it only says the attempt ended. The chunk must not stay RUNNING,
    # its lease kept alive for minutes by the worker that reported.
    async def chunk_ended() -> bool:
        cur = await own_db.execute("SELECT state FROM chunks WHERE job_id = %s", (job.id,))
        return await cur.fetchall() != [(ChunkState.RUNNING,)]

    await wait_for(chunk_ended, within=15, what="the chunk to leave RUNNING")
    cur = await own_db.execute("SELECT state, lease_expires_at FROM chunks WHERE job_id = %s", (job.id,))
    (state, lease), *others = await cur.fetchall()
    assert not others and state in (ChunkState.CANCELLED, ChunkState.SUCCEEDED) and lease is None, (state, lease)
