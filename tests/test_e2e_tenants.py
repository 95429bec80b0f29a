"""Tenants and API keys on the real gateway: every call needs a valid key, a key sees its own
tenant's jobs only (another tenant's job is NOT_FOUND, word for word as a job that does not exist),
and a revoked key is refused from its next call on."""

from __future__ import annotations

import asyncio
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobstream.local_files import DEV_TOKEN_FILE
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.helpers import count_jobs, new_tenant, params, run_cli, watch_all
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[Any]


async def _status(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


def _every_rpc(client: Client, job_id: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of each RPC, the ones that name a job naming `job_id`."""
    quick = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0))
    return {
        "Submit": lambda: client.Submit(quick),
        "GetJob": lambda: client.GetJob(pb.GetJobRequest(job_id=job_id)),
        "Watch": lambda: _drain(client.Watch(pb.WatchRequest(job_id=job_id))),
        "Cancel": lambda: client.Cancel(pb.CancelRequest(job_id=job_id)),
        "ListJobs": lambda: client.ListJobs(pb.ListJobsRequest()),
    }


@pytest.fixture
async def acme(stack: Stack, db: Db) -> AsyncIterator[Client]:
    _, token = await new_tenant(db, "acme")
    async with stack.channel(token) as channel:
        yield pb_grpc.JobServiceStub(channel)


@pytest.fixture
async def globex(stack: Stack, db: Db) -> AsyncIterator[Client]:
    _, token = await new_tenant(db, "globex")
    async with stack.channel(token) as channel:
        yield pb_grpc.JobServiceStub(channel)


async def test_another_tenants_job_is_not_found_exactly_as_a_job_that_does_not_exist(
    acme: Client, globex: Client, db: Db
) -> None:
    job = (await acme.Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, hang_chunk=0)))).job
    missing = str(uuid.uuid4())

    for name in ("GetJob", "Watch", "Cancel"):
        theirs = await _status(_every_rpc(globex, job.id)[name]())
        nothing = await _status(_every_rpc(globex, missing)[name]())
        assert theirs == (grpc.StatusCode.NOT_FOUND, nothing[1].replace(missing, job.id)), name
    listed = await globex.ListJobs(pb.ListJobsRequest(page_size=1000))
    assert job.id not in {j.id for j in listed.jobs}

    # globex's Cancel changed nothing: the job still runs until its own tenant cancels it.
    mine = await acme.GetJob(pb.GetJobRequest(job_id=job.id))
    assert mine.state in (pb.QUEUED, pb.RUNNING) and not mine.cancel_requested
    assert job.id in {j.id for j in (await acme.ListJobs(pb.ListJobsRequest(page_size=1000))).jobs}
    await acme.Cancel(pb.CancelRequest(job_id=job.id))
    assert (await watch_all(acme, job.id))[-1].type == pb.JOB_CANCELLED


async def test_the_same_idempotency_key_in_two_tenants_makes_two_jobs(acme: Client, globex: Client) -> None:
    request = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0), idempotency_key="nightly-report")

    ours, theirs = (await acme.Submit(request)).job, (await globex.Submit(request)).job

    assert ours.id != theirs.id
    assert (await acme.Submit(request)).job.id == ours.id


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("", "no API key"),
        ("not-a-key", "malformed"),
        ("jsk_0123456789abcdef_no-such-secret", "unknown, revoked or wrong"),
    ],
)
async def test_every_rpc_without_a_valid_key_is_unauthenticated_and_writes_nothing(
    stack: Stack, client: Client, db: Db, token: str, says: str
) -> None:
    job = (await client.Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0)))).job
    before = await count_jobs(db)
    async with stack.channel(token) as channel:
        anonymous = pb_grpc.JobServiceStub(channel)
        for name, call in _every_rpc(anonymous, job.id).items():
            code, details = await _status(call())
            assert code == grpc.StatusCode.UNAUTHENTICATED and says in details, (name, code, details)
    assert await count_jobs(db) == before
    assert not (await client.GetJob(pb.GetJobRequest(job_id=job.id))).cancel_requested


async def test_a_valid_secret_of_another_key_id_is_refused(stack: Stack, db: Db) -> None:
    _, token = await new_tenant(db, "spoof")
    prefix, key_id, secret = token[:4], token[4:20], token[21:]
    other_id = format(int(key_id, 16) ^ 1, "016x")
    async with stack.channel(f"{prefix}{other_id}_{secret}") as channel:
        code, _ = await _status(pb_grpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_known_key_id_with_a_wrong_secret_reads_nothing_even_beside_good_reads(stack: Stack, db: Db) -> None:
    """GetJob and Watch check the key in the statement that reads the job: a public key id with a
    guessed secret must get no job, also when its call shares that statement with good ones."""
    _, token = await new_tenant(db, "guess")
    wrong = token[:21] + "guessed-secret"
    async with stack.channel(token) as good_channel, stack.channel(wrong) as bad_channel:
        good, bad = pb_grpc.JobServiceStub(good_channel), pb_grpc.JobServiceStub(bad_channel)
        job = (await good.Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0)))).job
        calls: list[Awaitable[Any]] = [
            good.GetJob(pb.GetJobRequest(job_id=job.id)),
            bad.GetJob(pb.GetJobRequest(job_id=job.id)),
            _drain(bad.Watch(pb.WatchRequest(job_id=job.id))),
            bad.GetJob(pb.GetJobRequest(job_id="not-a-job-id")),
            good.GetJob(pb.GetJobRequest(job_id=str(uuid.uuid4()))),
            _drain(good.Watch(pb.WatchRequest(job_id=job.id))),
        ]
        outcomes = await asyncio.gather(*(_status(call) for call in calls))
    refused = (grpc.StatusCode.UNAUTHENTICATED, f"API key {token[4:20]} is unknown, revoked or wrong")
    assert outcomes == [
        (grpc.StatusCode.OK, ""),
        refused,
        refused,
        refused,  # the key is refused before the malformed job id is looked at
        (grpc.StatusCode.NOT_FOUND, outcomes[4][1]),
        (grpc.StatusCode.OK, ""),
    ]
    assert "not found" in outcomes[4][1]


async def test_health_checks_need_no_key(stack: Stack) -> None:
    async with stack.channel(token="") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------ the CLI's tenants and keys


async def test_keys_made_with_the_cli_work_and_a_revoked_one_is_refused_on_its_next_call(stack: Stack) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    created = await run_cli(stack, "tenants", "create", tenant, "--name", "CLI test")
    assert created.returncode == 0, created.stderr
    assert tenant in (await run_cli(stack, "tenants", "list")).stdout
    made = await run_cli(stack, "keys", "create", "--tenant", tenant, "--name", "ci")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    key_id = token[4:20]
    assert f"key {key_id} for tenant {tenant}" in made.stderr

    submitted = await run_cli(stack, "--token", token, "submit", "demo.sleep", "--param", "chunks=1", "--watch")
    assert submitted.returncode == 0, submitted.stderr
    listed = await run_cli(stack, "keys", "list", "--tenant", tenant)
    assert listed.returncode == 0 and key_id in listed.stdout and token not in listed.stdout

    async with stack.channel(token) as channel:
        client = pb_grpc.JobServiceStub(channel)
        assert (await _status(client.ListJobs(pb.ListJobsRequest()))) == (grpc.StatusCode.OK, "")
        revoked = await run_cli(stack, "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        # The very next call on the same connection is refused: no cache outlives a revocation.
        code, details = await _status(client.ListJobs(pb.ListJobsRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    listed = await run_cli(stack, "keys", "list", "--tenant", tenant)
    assert listed.stdout.splitlines()[1].split()[-1].endswith("Z"), listed.stdout  # the REVOKED column


async def test_the_cli_refuses_clearly_what_it_cannot_do(stack: Stack) -> None:
    twice = f"twice-{uuid.uuid4().hex[:8]}"
    assert (await run_cli(stack, "tenants", "create", twice)).returncode == 0
    again = await run_cli(stack, "tenants", "create", twice)
    assert again.returncode == 1 and f"tenant {twice} already exists" in again.stderr
    bad = await run_cli(stack, "tenants", "create", "Not Valid!")
    assert bad.returncode == 1 and "lower-case letters" in bad.stderr
    orphan = await run_cli(stack, "keys", "create", "--tenant", "no-such-tenant")
    assert orphan.returncode == 1 and "does not exist" in orphan.stderr
    unknown = await run_cli(stack, "keys", "revoke", "0000000000000000")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr


async def test_the_cli_uses_the_local_dev_token_when_no_key_is_given(stack: Stack, tmp_path: Path) -> None:
    token_file = stack.root / DEV_TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == stack.token

    without = await run_cli(stack, "list", cwd=tmp_path)
    assert without.returncode == 3 and "UNAUTHENTICATED: no API key" in without.stderr

    (tmp_path / ".jobstream").mkdir()
    (tmp_path / ".jobstream" / DEV_TOKEN_FILE).write_text(stack.token + "\n")
    listed = await run_cli(stack, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr


async def test_reads_made_together_each_get_their_own_answer(acme: Client, globex: Client) -> None:
    """GetJob and Watch of many jobs at once (a burst of clients reconnecting) are read in shared
    statements: each call still gets its own job, its own events, or NOT_FOUND."""
    jobs = [
        (await acme.Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=2, ms=0)))).job for _ in range(6)
    ]
    full = {job.id: await watch_all(acme, job.id) for job in jobs}

    async def resumed(job_id: str, after: int) -> list[tuple[str, int]]:
        return [(e.job_id, e.seq) async for e in acme.Watch(pb.WatchRequest(job_id=job_id, after_seq=after))]

    mine = [acme.GetJob(pb.GetJobRequest(job_id=job.id)) for job in jobs]
    theirs = [_status(globex.GetJob(pb.GetJobRequest(job_id=job.id))) for job in jobs]
    streams = [resumed(job.id, i % len(full[job.id])) for i, job in enumerate(jobs)]
    found, refused, replayed = await asyncio.gather(
        asyncio.gather(*mine), asyncio.gather(*theirs), asyncio.gather(*streams)
    )

    assert [j.id for j in found] == [job.id for job in jobs]
    assert [status for status, _ in refused] == [grpc.StatusCode.NOT_FOUND] * 6
    for i, (job, events) in enumerate(zip(jobs, replayed, strict=True)):
        after = i % len(full[job.id])
        assert events == [(job.id, e.seq) for e in full[job.id][after:]], job.id
