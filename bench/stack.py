"""The embedded stack the benchmarks run against: Postgres, broker, scheduler, gateway and a worker
pool whose size and concurrency a scenario can change, plus the memory each process uses."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiokafka.admin import AIOKafkaAdminClient

from jobstream.config import Settings
from jobstream.db import apply_schema
from jobstream.embedded.broker import EmbeddedBroker
from jobstream.embedded.ports import free_port
from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.embedded.procs import ChildProcess, descendants, log_tails, stop_services
from jobstream.topics import ensure_topics

REPO = Path(__file__).resolve().parent.parent
# Stopped workers stay silent group members until their session (10 s) expires, so waiting for the
# group to settle after a resize takes about that long.
GROUP_SETTLE_TIMEOUT = 60.0


@dataclass
class WorkerPool:
    count: int = 0
    concurrency: int = 0  # 0: the service default


@dataclass
class BenchStack:
    root: Path
    postgres: EmbeddedPostgres = field(init=False)
    broker: EmbeddedBroker = field(init=False)
    database_url: str = ""
    gateway_addr: str = ""
    services: dict[str, ChildProcess] = field(default_factory=dict)
    pool: WorkerPool = field(default_factory=WorkerPool)
    _generation: int = 0

    def __post_init__(self) -> None:
        self.postgres = EmbeddedPostgres(self.root / "postgres", durable=False)
        self.broker = EmbeddedBroker(self.root / "broker")

    @property
    def settings(self) -> Settings:
        return Settings(database_url=self.database_url, kafka_bootstrap=self.broker.bootstrap, kafka_leave_group=False)

    async def start(self) -> None:
        """Starts everything but workers; raises RuntimeError with the logs when the gateway does not come up."""
        self.database_url = await asyncio.to_thread(self.postgres.start)
        await asyncio.to_thread(self.broker.start)
        self.gateway_addr = f"127.0.0.1:{free_port()}"
        await apply_schema(self.database_url)
        await ensure_topics(self.settings)
        self._start("scheduler", "services.scheduler")
        self._start("gateway", "services.gateway")
        async with grpc.aio.insecure_channel(self.gateway_addr) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), 60)
            except TimeoutError:
                raise RuntimeError(f"gateway not ready after 60 s\n{self.log_tails()}") from None

    def _start(self, name: str, module: str, **env: str) -> ChildProcess:
        full_env = dict(os.environ)
        full_env.update(self.broker.client_env())
        full_env.update(
            JOBSTREAM_DATABASE_URL=self.database_url,
            JOBSTREAM_GATEWAY_LISTEN=self.gateway_addr,
            JOBSTREAM_LOG_LEVEL="WARNING",
            # The bench measures capacity; tenant quotas would measure themselves.
            JOBSTREAM_TENANT_SUBMIT_RATE="0",
            JOBSTREAM_TENANT_MAX_UNFINISHED_JOBS="0",
            JOBSTREAM_TENANT_MAX_WATCH_STREAMS="0",
            PYTHONPATH=str(REPO),
            **env,
        )
        proc = ChildProcess(
            name, [sys.executable, "-m", module], log_path=self.root / "logs" / f"{name}.log", env=full_env
        )
        proc.start()
        self.services[name] = proc
        return proc

    def workers(self) -> list[str]:
        return [name for name, proc in self.services.items() if name.startswith("worker") and proc.alive]

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
            self._start(name, "services.worker", JOBSTREAM_WORKER_ID=name, **env)
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

    def log_tails(self, lines: int = 30) -> str:
        return log_tails({**self.services, "broker": self.broker}, lines)

    def stop(self) -> None:
        stop_services(self.services)
        self.broker.stop()
        self.postgres.stop()


def _group_state(described: object, group: str) -> tuple[str, int]:
    # aiokafka returns the raw DescribeGroups responses; the field order is (error, group, state,
    # protocol type, protocol, members, ...) in every version it speaks.
    for response in described if isinstance(described, list) else [described]:
        for entry in getattr(response, "groups", []):
            if entry[1] == group:
                return str(entry[2]), len(entry[5])
    return "Unknown", 0


def pss_bytes(pid: int) -> int:
    """The process's proportional set size, or its RSS where smaps_rollup is not readable; 0 once gone."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0
