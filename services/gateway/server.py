"""Starts the gateway: Postgres pool, Kafka producer, outbox relay, updates hub, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from jobstream.config import Settings
from jobstream.db import open_pool
from jobstream.kafka import make_producer
from jobstream.observability import OpsServer, combine, postgres_ready, watch_pool
from jobstream.service import essential
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from services.gateway.api import JobService
from services.gateway.interceptors import ErrorMapping, Metrics, add_wrapped
from services.gateway.outbox import OutboxRelay
from services.gateway.quotas import Quotas
from services.gateway.store import JobStore
from services.gateway.watch import UpdatesHub

log = logging.getLogger("gateway")

SERVICE_NAME = "jobstream.v1.JobService"
# Bounds chosen on purpose: inputs up to the 16 MiB default limit plus framing; clients that vanish
# without closing are found by keepalive; long-lived connections are recycled so load spreads again.
MAX_MESSAGE_BYTES = 20 * 1024 * 1024
MAX_PENDING_CALLS = 50_000
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 5 * 60_000),
    # Calls that arrived but that the event loop has not taken up yet. gRPC's defaults (1,000,
    # then 3,000) cancel the excess with a bare CANCELLED as soon as a burst outruns the loop;
    # these calls are cheap to hold, so a burst queues instead and is answered late, not dropped.
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
]


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    pool = await open_pool(settings, name="gateway", min_size=2)
    producer = make_producer(settings)
    await producer.start()
    store = JobStore(pool, settings.job_partitions, settings.tenant_max_unfinished_jobs)
    relay = OutboxRelay(settings, pool, producer)
    hub = UpdatesHub(settings, store)
    await hub.start()
    relay_stop = asyncio.Event()
    relay_task = essential(relay.run(relay_stop), "outbox relay")
    watch_pool(pool)
    background = [asyncio.create_task(relay.track_backlog())]
    ops = OpsServer(settings.metrics_port, combine(lambda: postgres_ready(pool), hub.kafka_ready))
    await ops.start()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = JobService(settings, store, relay, hub, Quotas(settings))
    add_wrapped(server, pb_grpc.add_JobServiceServicer_to_server, service, [Metrics(), ErrorMapping()])
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["JobService"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _listen(server, settings)
    if port == 0:
        raise RuntimeError(f"gateway cannot listen on {settings.gateway_listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gateway serving on %s (%s)", settings.gateway_listen, _security(settings))

    await stop.wait()
    log.info("gateway stopping")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Streams end at once (clients resume elsewhere with after_seq); unary calls get a grace period.
    await server.stop(grace=5)
    relay_stop.set()
    relay.wake()
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(relay_task, 5)
    for task in background:
        task.cancel()
    await ops.stop()
    await hub.stop()
    await producer.stop()
    await pool.close()


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    if not settings.gateway_tls_cert:
        return server.add_insecure_port(settings.gateway_listen)
    client_ca = Path(settings.gateway_tls_client_ca).read_bytes() if settings.gateway_tls_client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(Path(settings.gateway_tls_key).read_bytes(), Path(settings.gateway_tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(settings.gateway_listen, credentials)


def _security(settings: Settings) -> str:
    if settings.gateway_tls_client_ca:
        return "TLS, client certificates required"
    return "TLS" if settings.gateway_tls_cert else "plaintext"
