from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from jobstream.db import apply_schema
from jobstream.embedded.broker import EmbeddedBroker
from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.states import ChunkState, JobState
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

WORKERS = 3
# Stacks now running, so a failing test's report carries what their processes logged.
LIVE_STACKS: list[Stack] = []
# The newest unfinished jobs a failing test's report details chunk by chunk, with their log lines.
UNFINISHED_JOBS_DETAILED = 3
UNFINISHED_CHUNKS_SHOWN = 10  # of each of those jobs
UNFINISHED_LOG_LINES = 10  # of each service's log, for each of those jobs


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A bare embedded broker of the test's own, for what the broker itself does."""
    with EmbeddedBroker(tmp_path) as started:
        yield started


@pytest.fixture
async def admin(broker: EmbeddedBroker) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client of the test's own broker."""
    client = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def producer(broker: EmbeddedBroker) -> AsyncIterator[AIOKafkaProducer]:
    """A producer to the test's own broker that soon sees a topic re-created there."""
    started = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, metadata_max_age_ms=1000)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture(scope="session")
def stack_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@contextlib.asynccontextmanager
async def running_stack(
    root: Path, workers: int, *, gateways: int = 1, schedulers: int = 1, **env: str
) -> AsyncIterator[Stack]:
    """A real stack: Postgres, broker, schedulers, gateways and workers, stopped on exit."""
    stack = Stack(root=root, env_overrides=env)
    LIVE_STACKS.append(stack)
    try:
        await stack.start(workers=workers, gateways=gateways, schedulers=schedulers)
        yield stack
    finally:
        LIVE_STACKS.remove(stack)
        stack.stop()


@pytest.fixture(scope="session")
async def stack(stack_root: Path) -> AsyncIterator[Stack]:
    """The stack most tests share; tests that kill processes start their own."""
    async with running_stack(stack_root, WORKERS) as stack:
        yield stack


@contextlib.asynccontextmanager
async def client_of(stack: Stack) -> AsyncIterator[Client]:
    """A client of the stack's gateway, for modules that run a stack of their own."""
    async with stack.channel() as channel:
        yield pb_grpc.JobServiceStub(channel)


@contextlib.asynccontextmanager
async def db_of(stack: Stack) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def own_client(own: Stack) -> AsyncIterator[Client]:
    """A client of the module's own stack (the module defines an `own` fixture)."""
    async with client_of(own) as client:
        yield client


@pytest.fixture
async def own_db(own: Stack) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
    async with db_of(own) as conn:
        yield conn


@pytest.fixture(scope="session")
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with stack.channel() as channel:
        yield channel


@pytest.fixture(scope="session")
def client(channel: grpc.aio.Channel) -> Client:
    return pb_grpc.JobServiceStub(channel)


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
    async with db_of(stack) as conn:
        yield conn


# Figures that tests measure (recovery times, counts) are printed at the end of the run, so a
# CI log carries them without -s. They travel in the test's report: the suite runs in several
# processes (pytest-xdist), and only the reports reach the one that prints the summary.
FIGURE = "measured figure"
Record = Callable[[str], None]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Record:
    """Records a line for the run's "measured figures" section."""
    return lambda line: request.node.user_properties.append((FIGURE, line))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        str(value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == FIGURE
    ]
    if lines:
        terminalreporter.section("measured figures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed:
        for stack in LIVE_STACKS:
            report.sections.append((f"logs of the stack in {stack.root}", stack.log_tails()))
            report.sections.append((f"unfinished jobs of the stack in {stack.root}", _unfinished_jobs(stack)))
    return report


def _unfinished_jobs(stack: Stack) -> str:
    """Where each unfinished job stands in Postgres (its chunks by state, its last event, and for the
    newest jobs the chunks not done: attempt, claims, worker, lease left) and what the services
    logged about those jobs: a job that never ended shows how far it got and who held it, where the
    ends of the logs say nothing."""
    try:
        with psycopg.connect(stack.database_url, autocommit=True, connect_timeout=5) as conn:
            jobs = conn.execute(
                "SELECT j.id, j.state, j.total_chunks, j.done_chunks, j.last_seq, j.created_at,"
                " (SELECT string_agg(s.state || ' x' || s.n, ', ' ORDER BY s.state)"
                "    FROM (SELECT state, count(*) AS n FROM chunks c WHERE c.job_id = j.id GROUP BY state) s)"
                " FROM jobs j WHERE j.state IN (%s, %s) ORDER BY j.created_at DESC LIMIT 20",
                (JobState.QUEUED, JobState.RUNNING),
            ).fetchall()
            outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()
            chunks = conn.execute(
                "SELECT job_id, idx, state, attempt, claims, worker_id, lease_left FROM"
                " (SELECT job_id, idx, state, attempt, claims, worker_id,"
                "  round(extract(epoch FROM lease_expires_at - now())::numeric, 1) AS lease_left,"
                "  row_number() OVER (PARTITION BY job_id ORDER BY idx) AS n"
                "  FROM chunks WHERE job_id = ANY(%s) AND state IN (%s, %s)) c"
                " WHERE n <= %s ORDER BY job_id, idx",
                (
                    [job[0] for job in jobs[:UNFINISHED_JOBS_DETAILED]],
                    ChunkState.PENDING,
                    ChunkState.RUNNING,
                    UNFINISHED_CHUNKS_SHOWN,
                ),
            ).fetchall()
    except psycopg.Error as err:
        return f"Postgres did not answer: {err}"
    undone: dict[Any, list[str]] = {job[0]: [] for job in jobs[:UNFINISHED_JOBS_DETAILED]}
    for job_id, idx, state, attempt, claims, worker, left in chunks:
        undone[job_id].append(
            f"  chunk {idx} state {state} attempt {attempt} claims {claims} worker {worker} lease left {left}s"
        )
    # Read once, and only when some job is detailed: a log is up to a megabyte a service.
    logs = {name: p.log_end(1024 * 1024).splitlines() for name, p in stack.services.items()} if undone else {}
    lines = [f"outbox rows waiting: {outbox[0] if outbox else '?'}"]
    for job_id, state, total, done, seq, created, by_state in jobs:
        lines.append(
            f"job {job_id} state {state} chunks {done}/{total} (by state: {by_state or 'none'}) last_seq {seq}"
            f" created {created:%H:%M:%S.%f}"
        )
        if job_id in undone:
            lines += undone[job_id]
            for name, log in logs.items():
                lines += [f"  {name}: {line}" for line in log if str(job_id) in line][-UNFINISHED_LOG_LINES:]
    return "\n".join(lines)


@pytest.fixture
async def postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A Postgres of the test's own, with the schema, so what the test does to it disturbs nothing else."""
    pg = EmbeddedPostgres(tmp_path / "pg", durable=False)
    await apply_schema(await asyncio.to_thread(pg.start))
    try:
        yield pg
    finally:
        await asyncio.to_thread(pg.stop)
