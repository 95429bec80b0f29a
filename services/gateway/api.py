"""The JobService handlers: validate, then one store call each (Submit validates inside its store
call, once the key is known good). Errors are raised, never mapped here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from jobstream import api_keys
from jobstream.config import Settings
from jobstream.errors import InvalidArgument, ResourceExhausted
from jobstream.job_options import options_from_proto
from jobstream.kinds import get_kind
from jobstream.states import JobState
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from services.gateway.convert import job_to_proto
from services.gateway.metrics import JOBS_SUBMITTED
from services.gateway.outbox import OutboxRelay
from services.gateway.quotas import Quotas
from services.gateway.store import JobStore, NewJob, Owned, parse_job_id
from services.gateway.watch import UpdatesHub, watch_events

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_IDEMPOTENCY_KEY = 200
MAX_REASON = 1000


def _params_json(params: struct_pb2.Struct) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(params)
    except ValueError as err:  # NaN and Infinity have no JSON form
        raise InvalidArgument(f"params: every number must be finite ({err})", field="params") from None


class JobService(pb_grpc.JobServiceServicer):
    def __init__(
        self, settings: Settings, store: JobStore, relay: OutboxRelay, hub: UpdatesHub, quotas: Quotas
    ) -> None:
        self._settings = settings
        self._store = store
        self._relay = relay
        self._hub = hub
        self._quotas = quotas

    async def _tenant(self, context: Context) -> str:
        """The caller's tenant, from its API key; looked up on every call so a revoked key is
        refused from its next call on, on every gateway."""
        token = api_keys.bearer_token(context.invocation_metadata())
        return await self._store.tenant_of(token)

    async def Submit(self, request: pb.SubmitRequest, context: Context) -> pb.SubmitResponse:
        token = api_keys.bearer_token(context.invocation_metadata())

        # Runs in the store's batch, after the key lookup every Submit needs anyway: refusals
        # keep their order (key, then rate, then request) and cost no round trip of their own.
        def admit(tenant: str) -> NewJob:
            self._quotas.admit_submit(tenant)
            return self._validate_submit(request, tenant)

        row, created = await self._store.submit(token, admit)
        if created:
            self._relay.wake()
            JOBS_SUBMITTED.labels(kind=request.kind).inc()
        return pb.SubmitResponse(job=job_to_proto(row))

    def _validate_submit(self, request: pb.SubmitRequest, tenant_id: str) -> NewJob:
        if not request.kind:
            raise InvalidArgument("kind: required", field="kind")
        kind = get_kind(request.kind)
        limit = kind.max_input_bytes or self._settings.max_input_bytes
        if len(request.input) > limit:
            raise ResourceExhausted(f"input: {len(request.input)} bytes is over the limit of {limit} bytes")
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"idempotency_key: at most {MAX_IDEMPOTENCY_KEY} characters", field="idempotency_key")
        params = kind.params.validate(_params_json(request.params))
        kind.validate_input(params, request.input)
        chunks = kind.count_chunks(params, request.input)
        if chunks > self._settings.max_chunks_per_job:
            raise InvalidArgument(
                f"the job would have {chunks} chunks; at most {self._settings.max_chunks_per_job} are allowed",
                field="params",
            )
        options = options_from_proto(request.options)
        return NewJob(tenant_id, request.kind, params, request.input, request.idempotency_key, options)

    async def _job(self, context: Context, raw_job_id: str) -> Owned:
        """The caller's tenant and the job it names, checked and read in one statement."""
        token = api_keys.bearer_token(context.invocation_metadata())
        try:
            job_id = parse_job_id(raw_job_id)
        except InvalidArgument:
            await self._store.tenant_of(token)  # a bad key is refused before anything about the request
            raise
        return await self._store.job_for(token, job_id)

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.Job:
        _, row = await self._job(context, request.job_id)
        return job_to_proto(row)

    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.CancelResponse:
        tenant = await self._tenant(context)
        job_id = parse_job_id(request.job_id)
        if len(request.reason) > MAX_REASON:
            raise InvalidArgument(f"reason: at most {MAX_REASON} characters", field="reason")
        row = await self._store.request_cancel(tenant, job_id, request.reason)
        self._relay.wake()
        return pb.CancelResponse(job=job_to_proto(row))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        tenant = await self._tenant(context)
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size: at most {MAX_PAGE_SIZE}, got {page_size}", field="page_size")
        if request.state not in pb.JobState.values():
            raise InvalidArgument(f"state: unknown job state {request.state}", field="state")
        rows, token = await self._store.list_jobs(
            tenant,
            page_size=page_size,
            page_token=request.page_token,
            state=request.state,
            kind=request.kind,
        )
        return pb.ListJobsResponse(jobs=[job_to_proto(r) for r in rows], next_page_token=token)

    async def Watch(self, request: pb.WatchRequest, context: Context) -> AsyncIterator[pb.JobEvent]:
        tenant, job = await self._job(context, request.job_id)
        job_id = job["id"]
        if request.after_seq > job["last_seq"]:
            raise InvalidArgument(
                f"after_seq: {request.after_seq} is past the job's last event ({job['last_seq']})",
                field="after_seq",
            )
        if request.after_seq == job["last_seq"] and JobState(job["state"]).terminal:
            return  # the client already saw the terminal event
        with self._quotas.watch_stream(tenant):
            async for event in watch_events(self._hub, job_id, request.after_seq):
                yield event
