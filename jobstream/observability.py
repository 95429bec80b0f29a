"""What every service exposes to operators: /metrics, /livez and /readyz on one small HTTP port,
and the metrics all services share (Postgres pool usage, Kafka consumer lag).

A bare asyncio server is enough for three GET endpoints and keeps the probes on the service's own
event loop: a loop that is stuck stops answering /livez, which is exactly what liveness should see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[str | None]]  # None when ready, else the reason it is not

CONSUMER_LAG = Gauge(
    "jobstream_kafka_consumer_lag",
    "Records on the broker not yet consumed by this process, per topic and group.",
    ["topic", "group"],
)


class PoolCollector(Collector):
    """Reads pool usage at scrape time, so the numbers are never stale."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self._pool.get_stats()
        family = GaugeMetricFamily(
            "jobstream_db_pool_connections", "Postgres connections of this process's pool.", labels=["state"]
        )
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        family.add_metric(["used"], size - idle)
        family.add_metric(["idle"], idle)
        family.add_metric(["max"], stats.get("pool_max", self._pool.max_size))
        yield family


def watch_pool(pool: AsyncConnectionPool, registry: CollectorRegistry = REGISTRY) -> None:
    with contextlib.suppress(ValueError):  # already registered (a test that starts twice)
        registry.register(PoolCollector(pool))


async def track_lag(current: Callable[[], AIOKafkaConsumer], group: str, every_s: float = 2.0) -> None:
    """Updates the lag gauge from the consumer's own view (highwater minus position)."""
    while True:
        consumer = current()
        totals: dict[str, int] = {}
        for tp in consumer.assignment():
            totals.setdefault(tp.topic, 0)
            high = consumer.highwater(tp)
            if high is None:  # nothing fetched from it yet
                continue
            with contextlib.suppress(Exception):
                position = await consumer.position(tp)
                totals[tp.topic] = totals.get(tp.topic, 0) + max(0, high - position)
        for topic, lag in totals.items():
            CONSUMER_LAG.labels(topic=topic, group=group).set(lag)
        await asyncio.sleep(every_s)


class OpsServer:
    """GET /metrics, /livez, /readyz on `port` (0 = disabled)."""

    def __init__(self, port: int, ready: ReadyCheck, host: str = "0.0.0.0") -> None:
        self._port = port
        self._host = host
        self._ready = ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._port == 0:
            return
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("metrics and health on :%d", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode("latin-1") if request.count(b" ") >= 2 else ""
            status, body, ctype = await self._route(path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            return "200 OK", generate_latest(REGISTRY), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/livez":
            return "200 OK", b"ok\n", text
        if path == "/readyz":
            try:
                reason = await asyncio.wait_for(self._ready(), 5)
            except Exception as err:
                reason = f"readiness check failed: {err}"
            if reason is None:
                return "200 OK", b"ready\n", text
            return "503 Service Unavailable", f"not ready: {reason}\n".encode(), text
        return "404 Not Found", b"not found\n", text


async def postgres_ready(pool: AsyncConnectionPool) -> str | None:
    try:
        async with pool.connection(timeout=3) as conn:
            await conn.execute("SELECT 1")
    except Exception as err:
        return f"postgres unreachable: {err}"
    return None


async def kafka_ready(consumer: AIOKafkaConsumer) -> str | None:
    """Ready while the consumer's client holds a live connection to a broker."""
    try:
        await asyncio.wait_for(consumer._client.fetch_all_metadata(), 3)
    except Exception as err:
        return f"kafka unreachable: {err}"
    return None


def combine(*checks: ReadyCheck) -> ReadyCheck:
    async def check() -> str | None:
        for each in checks:
            reason = await each()
            if reason is not None:
                return reason
        return None

    return check
