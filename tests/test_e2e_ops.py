"""What operators see: metrics, liveness and readiness on every service, gRPC health on the gateway."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobstream.embedded.stack import REPO
from jobstream.v1 import jobstream_pb2 as pb
from tests.helpers import http_get, scrape, submit, wait_for, watch_all
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e


async def test_every_service_is_live_ready_and_exposes_metrics(stack: Stack, client: Client) -> None:
    job = await submit(client, "demo.sleep", chunks=4, ms=10)
    await watch_all(client, job.id)

    for service in ("gateway", "scheduler", "worker-1"):
        port = stack.metrics_ports[service]
        assert await asyncio.to_thread(http_get, port, "/livez") == (200, "ok\n")
        assert await asyncio.to_thread(http_get, port, "/readyz") == (200, "ready\n")
        assert (await asyncio.to_thread(http_get, port, "/nope"))[0] == 404

    gateway = await scrape(stack, "gateway")
    assert 'jobstream_jobs_submitted_total{kind="demo.sleep"}' in gateway
    assert 'jobstream_grpc_requests_total{code="OK",method="Submit"}' in gateway
    assert "jobstream_event_latency_seconds_bucket" in gateway
    assert 'jobstream_db_pool_connections{state="max"}' in gateway
    scheduler = await scrape(stack, "scheduler")
    assert 'jobstream_jobs_finished_total{kind="demo.sleep",state="succeeded"}' in scheduler

    async def lag_reported() -> bool:
        return 'jobstream_kafka_consumer_lag{group="jobstream-scheduler",topic="jobs.progress"}' in await scrape(
            stack, "scheduler"
        )

    await wait_for(lag_reported, within=10, what="the scheduler to report its consumer lag")
    worker = await scrape(stack, "worker-1")
    assert "jobstream_worker_concurrency 8.0" in worker


async def test_grpc_errors_are_counted_by_code(stack: Stack, client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await client.GetJob(pb.GetJobRequest(job_id="bad"))

    gateway = await scrape(stack, "gateway")
    assert 'jobstream_grpc_requests_total{code="INVALID_ARGUMENT",method="GetJob"}' in gateway


async def test_a_watch_the_client_cancels_is_counted_as_cancelled(stack: Stack, client: Client) -> None:
    job = await submit(client, "demo.sleep", chunks=1, hang_chunk=0)
    stream = client.Watch(pb.WatchRequest(job_id=job.id))
    await stream.read()  # the stream is open on the server
    stream.cancel()
    line = 'jobstream_grpc_requests_total{code="CANCELLED",method="Watch"}'

    async def counted() -> bool:
        return line in await scrape(stack, "gateway")

    try:
        await wait_for(counted, within=10, what=f"{line} on the gateway")
    finally:
        await client.Cancel(pb.CancelRequest(job_id=job.id))
    assert 'code="UNKNOWN",method="Watch"' not in await scrape(stack, "gateway")


async def test_gateway_serves_grpc_health(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jobstream.v1.JobService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
@pytest.mark.parametrize("service", ["gateway", "scheduler", "worker-1"])
async def test_promtool_finds_nothing_wrong_with_the_metrics(stack: Stack, service: str) -> None:
    body = await scrape(stack, service)
    result = await asyncio.to_thread(
        subprocess.run, ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


async def test_gateway_serves_reflection(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    responses = [r async for r in stub.ServerReflectionInfo(requests())]

    names = {s.name for s in responses[0].list_services_response.service}
    assert {"jobstream.v1.JobService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("service", "variable", "value", "says"),
    [
        (
            "services.gateway",
            "JOBSTREAM_JOB_PARTITIONS",
            "6",
            "jobs.submitted has 12 partitions, but JOBSTREAM_JOB_PARTITIONS is 6",
        ),
        (
            "services.scheduler",
            "JOBSTREAM_JOB_PARTITIONS",
            "24",
            "jobs.progress has 12 partitions, but JOBSTREAM_JOB_PARTITIONS is 24",
        ),
        (
            "services.worker",
            "JOBSTREAM_CHUNK_PARTITIONS",
            "12",
            "jobs.chunks has 24 partitions, but JOBSTREAM_CHUNK_PARTITIONS is 12",
        ),
    ],
)
async def test_a_service_whose_partition_counts_differ_from_the_topics_refuses_to_start(
    stack: Stack, service: str, variable: str, value: str, says: str
) -> None:
    """A stale count would send jobs to partitions no scheduler reads, or hash them onto the
    partition another scheduler owns; the service says which variable is wrong and exits 2."""
    env = stack.service_env(JOBSTREAM_METRICS_PORT="0", JOBSTREAM_GATEWAY_LISTEN="127.0.0.1:0", **{variable: value})
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", service], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr, done.stderr
