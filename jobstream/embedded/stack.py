"""A whole jobstream on this machine for tests and benchmarks: embedded Postgres and broker, plus
the services as child processes, each on free ports, in one folder."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from jobstream.config import Settings
from jobstream.db import apply_schema
from jobstream.embedded.broker import EmbeddedBroker
from jobstream.embedded.dev_key import provision_dev_token
from jobstream.embedded.ports import free_port
from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.embedded.procs import ChildProcess, log_tails, replica_name, stop_services
from jobstream.gateway_channel import gateway_channel
from jobstream.local_files import DEV_TOKEN_FILE
from jobstream.topics import ensure_topics

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LocalStack:
    root: Path
    postgres: EmbeddedPostgres = field(init=False)
    broker: EmbeddedBroker = field(init=False)
    database_url: str = ""
    bootstrap: str = ""
    gateway_addr: str = ""  # the first gateway's
    gateway_addrs: list[str] = field(default_factory=list)
    token: str = ""  # the dev tenant's API key, also in root/dev-token
    services: dict[str, ChildProcess] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    env_overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.postgres = EmbeddedPostgres(self.root / "postgres", durable=False)
        self.broker = EmbeddedBroker(self.root / "broker")

    @property
    def settings(self) -> Settings:
        """What the services run with: the topics made from it must have the partition counts the
        services expect (JOBSTREAM_JOB_PARTITIONS in `env_overrides` included)."""
        return Settings.from_env(self.service_env())

    def service_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.broker.client_env())
        env.update(
            JOBSTREAM_DATABASE_URL=self.database_url,
            JOBSTREAM_GATEWAY_LISTEN=self.gateway_addr,
            PYTHONPATH=str(REPO),
        )
        env.update(self.env_overrides)
        env.update(extra)
        return env

    def start_service(self, name: str, module: str, **env: str) -> ChildProcess:
        port = self.metrics_ports.setdefault(name, free_port())
        proc = ChildProcess(
            name,
            [sys.executable, "-m", module],
            log_path=self.root / "logs" / f"{name}.log",
            env=self.service_env(JOBSTREAM_METRICS_PORT=str(port), **env),
            cwd=REPO,
        )
        proc.start()
        self.services[name] = proc
        return proc

    def start_worker(self, name: str, **env: str) -> ChildProcess:
        return self.start_service(name, "services.worker", JOBSTREAM_WORKER_ID=name, **env)

    def workers(self) -> list[str]:
        return [n for n, p in self.services.items() if n.startswith("worker") and p.alive]

    async def start(self, workers: int, gateways: int = 1, schedulers: int = 1) -> None:
        """Starts everything; replicas are named `gateway`, `gateway-2`, ... (likewise schedulers)."""
        self.database_url = await asyncio.to_thread(self.postgres.start)
        self.bootstrap = await asyncio.to_thread(self.broker.start)
        self.gateway_addrs = [f"127.0.0.1:{free_port()}" for _ in range(gateways)]
        self.gateway_addr = self.gateway_addrs[0]
        await apply_schema(self.database_url)
        self.token = await provision_dev_token(self.database_url, self.root / DEV_TOKEN_FILE)
        await ensure_topics(self.settings)
        for i in range(1, schedulers + 1):
            self.start_service(replica_name("scheduler", i), "services.scheduler")
        for i, addr in enumerate(self.gateway_addrs, 1):
            self.start_service(replica_name("gateway", i), "services.gateway", JOBSTREAM_GATEWAY_LISTEN=addr)
        for i in range(1, workers + 1):
            self.start_worker(f"worker-{i}")
        for addr in self.gateway_addrs:
            await self.wait_gateway(addr)

    def channel(self, token: str | None = None, gateway: int = 0) -> grpc.aio.Channel:
        """A channel to a gateway (by index) whose calls carry `token` (default the dev tenant's key)."""
        return gateway_channel(self.gateway_addrs[gateway], token=self.token if token is None else token)

    async def wait_gateway(self, addr: str | None = None, within: float = 60) -> None:
        async with grpc.aio.insecure_channel(addr or self.gateway_addr) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), within)
            except TimeoutError:
                raise RuntimeError(f"gateway {addr} not ready after {within}s\n{self.log_tails()}") from None

    def log_tails(self, lines: int = 40) -> str:
        return log_tails({**self.services, "broker": self.broker}, lines)

    def stop(self) -> None:
        stop_services(self.services)
        self.broker.stop()
        self.postgres.stop()
