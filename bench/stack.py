"""The embedded stack the benchmarks run against: Postgres, broker, scheduler, gateway and a worker
pool whose size and concurrency a scenario can change, plus the memory each process uses."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import psycopg
from aiokafka.admin import AIOKafkaAdminClient

from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.embedded.procs import descendants
from jobstream.embedded.stack import LocalStack
from jobstream.states import JobState

# Stopped workers stay silent group members until their session (10 s) expires, so waiting for the
# group to settle after a resize takes about that long.
GROUP_SETTLE_TIMEOUT = 60.0
# Jobs left over from a phase finish within this long, or something is stuck.
QUIET_TIMEOUT = 120.0


@dataclass
class WorkerPool:
    count: int = 0
    concurrency: int = 0  # 0: the service default


# The bench measures capacity; tenant quotas would measure themselves.
BENCH_ENV = {
    "JOBSTREAM_LOG_LEVEL": "WARNING",
    "JOBSTREAM_TENANT_SUBMIT_RATE": "0",
    "JOBSTREAM_TENANT_MAX_UNFINISHED_JOBS": "0",
    "JOBSTREAM_TENANT_MAX_WATCH_STREAMS": "0",
}


@dataclass
class BenchStack(LocalStack):
    pool: WorkerPool = field(default_factory=WorkerPool)
    _generation: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.env_overrides = {**BENCH_ENV, **self.env_overrides}
        # Counts statements for the capacity scenario (a small cost on every statement).
        self.postgres = EmbeddedPostgres(
            self.root / "postgres", durable=False, settings={"shared_preload_libraries": "pg_stat_statements"}
        )

    async def set_workers(self, count: int, concurrency: int = 0) -> None:
        """Runs exactly `count` workers with this concurrency, and returns once the worker group has
        settled with them all (so a measurement never includes a rebalance)."""
        if self.pool == WorkerPool(count, concurrency) and len(self.workers()) == count:
            return
        running = self.workers()
        if concurrency != self.pool.concurrency:
            keep: list[str] = []
        else:
            keep = running[:count]
        for name in running:
            if name not in keep:
                await asyncio.to_thread(self.services.pop(name).terminate, 30)
        env = {"JOBSTREAM_WORKER_CONCURRENCY": str(concurrency)} if concurrency else {}
        while len(keep) < count:
            self._generation += 1
            name = f"worker-{self._generation}"
            self.start_worker(name, **env)
            keep.append(name)
        self.pool = WorkerPool(count, concurrency)
        await self._wait_group(count)

    async def _wait_group(self, members: int) -> None:
        group = self.settings.group("workers")
        admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        await admin.start()
        deadline = time.monotonic() + GROUP_SETTLE_TIMEOUT
        try:
            while True:
                described = await admin.describe_consumer_groups([group])
                state, count = _group_state(described, group)
                if state == "Stable" and count == members:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker group {state} with {count} members, not {members}\n{self.log_tails()}")
                await asyncio.sleep(0.5)
        finally:
            await admin.close()

    async def wait_quiet(self, within: float = QUIET_TIMEOUT) -> None:
        """Returns once no job is queued or running: the jobs an earlier phase submitted run on the
        same cores, so a phase that starts before they end measures their work as well as its own."""
        deadline = time.monotonic() + within
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM jobs WHERE state IN (%s, %s)", (JobState.QUEUED, JobState.RUNNING)
                )
                row = await cur.fetchone()
                if row is None or row[0] == 0:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{row[0]} jobs still queued or running after {within:.0f} s")
                await asyncio.sleep(0.2)

    def dead(self) -> list[str]:
        """The services that exited although nobody stopped them."""
        return [name for name, proc in self.services.items() if not proc.alive]

    def revive(self) -> None:
        """Starts again every service that exited, so one crash costs one scenario, not the run."""
        for name in self.dead():
            self.services[name].start()

    def memory(self) -> dict[str, int]:
        """Proportional set size (bytes) of each service, its child processes included, so shared
        pages (Postgres's shared buffers) are counted once across processes."""
        tree = {name: proc.pid for name, proc in self.services.items() if proc.alive and proc.pid}
        tree["broker"] = self.broker.pid or 0
        tree["postgres"] = self.postgres.pid or 0
        return {name: sum(pss_bytes(p) for p in [pid, *descendants(pid)]) for name, pid in tree.items() if pid}


def _group_state(described: object, group: str) -> tuple[str, int]:
    # aiokafka returns the raw DescribeGroups responses; the field order is (error, group, state,
    # protocol type, protocol, members, ...) in every version it speaks.
    for response in described if isinstance(described, list) else [described]:
        for entry in getattr(response, "groups", []):
            if entry[1] == group:
                return str(entry[2]), len(entry[5])
    return "Unknown", 0


def proc_bytes(pid: int, path: str, key: str) -> int | None:
    """A memory figure (kB in the file) from /proc/<pid>/<path>, in bytes; None if unreadable."""
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pss_bytes(pid: int) -> int:
    """The process's proportional set size, or its RSS where smaps_rollup is not readable; 0 once gone."""
    for path, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        found = proc_bytes(pid, path, key)
        if found is not None:
            return found
    return 0
