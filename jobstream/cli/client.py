"""The CLI's calls to the gateway. Watching resumes with after_seq when the stream breaks, so a
gateway restart shows as a pause, not as an error."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import grpc
from google.protobuf import struct_pb2

from jobstream.cli import render
from jobstream.events import is_terminal
from jobstream.v1 import jobstream_pb2 as pb

if TYPE_CHECKING:
    from jobstream.v1.jobstream_pb2_grpc import JobServiceAsyncStub as Stub

RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
RESUME_FOR_SECONDS = 30.0
EXIT_OK, EXIT_JOB_NOT_SUCCEEDED, EXIT_USAGE, EXIT_RPC = 0, 1, 2, 3


class UsageError(Exception):
    """Bad command-line input; the message says which."""


def build_submit(args: argparse.Namespace) -> pb.SubmitRequest:
    params = struct_pb2.Struct()
    if args.params_json:
        try:
            params.update(json.loads(args.params_json))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise UsageError(f"--params-json is not a JSON object: {err}") from None
    for item in args.param or []:
        try:
            key, value = render.parse_param(item)
        except ValueError as err:
            raise UsageError(str(err)) from None
        params.update({key: value})
    data = b""
    if args.input == "-":
        data = sys.stdin.buffer.read()
    elif args.input:
        try:
            data = Path(args.input).read_bytes()
        except OSError as err:
            raise UsageError(f"--input: {err}") from None
    return pb.SubmitRequest(kind=args.kind, params=params, input=data, idempotency_key=args.idempotency_key or "")


async def submit(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    response = await stub.Submit(build_submit(args), timeout=args.timeout)
    if not args.watch:
        print(response.job.id, file=out)
        return EXIT_OK
    print(f"submitted job {response.job.id}", file=out)
    return await watch(stub, response.job.id, 0, plain=args.plain, out=out)


async def watch(stub: Stub, job_id: str, after_seq: int, *, plain: bool, out: TextIO) -> int:
    live = not plain and out.isatty()
    last: pb.JobEvent | None = None
    waited = 0.0
    while True:
        try:
            async for event in stub.Watch(pb.WatchRequest(job_id=job_id, after_seq=after_seq)):
                last, after_seq, waited = event, event.seq, 0.0
                if live:
                    width = shutil.get_terminal_size().columns
                    print("\r\033[K" + render.progress_line(event, width), end="", file=out, flush=True)
                else:
                    print(render.event_line(event), file=out, flush=True)
                if is_terminal(event):
                    if live:
                        print(file=out)
                    print(render.outcome_line(event), file=out)
                    return EXIT_OK if event.state == pb.SUCCEEDED else EXIT_JOB_NOT_SUCCEEDED
            if last is not None and is_terminal(last):
                return EXIT_OK if last.state == pb.SUCCEEDED else EXIT_JOB_NOT_SUCCEEDED
            if last is None:  # resumed after the terminal event: nothing more will come
                job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
                return EXIT_OK if job.state == pb.SUCCEEDED else EXIT_JOB_NOT_SUCCEEDED
        except grpc.aio.AioRpcError as err:
            if err.code() not in RESUMABLE or waited >= RESUME_FOR_SECONDS:
                raise
        delay = min(2.0, 0.2 + waited / 4)
        waited += delay
        await asyncio.sleep(delay)


async def cancel(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    response = await stub.Cancel(pb.CancelRequest(job_id=args.job_id, reason=args.reason), timeout=args.timeout)
    job = response.job
    print(f"job {job.id} {render.state_name(job.state)} cancel_requested={str(job.cancel_requested).lower()}", file=out)
    return EXIT_OK


async def get(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    print(render.job_json(await stub.GetJob(pb.GetJobRequest(job_id=args.job_id), timeout=args.timeout)), file=out)
    return EXIT_OK


async def list_jobs(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    state = pb.JobState.Value(args.state.upper()) if args.state else pb.JOB_STATE_UNSPECIFIED
    jobs: list[pb.Job] = []
    token = ""
    while True:
        request = pb.ListJobsRequest(page_size=args.page_size, page_token=token, state=state, kind=args.kind or "")
        response = await stub.ListJobs(request, timeout=args.timeout)
        jobs += response.jobs
        token = response.next_page_token
        if not token or not args.all:
            break
    print(render.job_table(jobs), file=out)
    if token:
        print(f"(more: --all, or page token {token})", file=out)
    return EXIT_OK
