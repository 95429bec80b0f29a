"""The CLI's calls to the gateway, and the two ways a watch is shown.

Watching resumes with `after_seq` when the stream breaks, for up to RESUME_FOR_SECONDS: streams are
resumable by design, so a gateway restart or a dropped connection shows as a pause, not a failure.
`run` is the only place an event loop starts and the only place errors become exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

import grpc

from jobstream.cli import render
from jobstream.events import is_terminal, to_struct
from jobstream.gateway_channel import gateway_channel
from jobstream.local_files import DEV_TOKEN_FILE, read_local
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from jobstream.v1.jobstream_pb2_grpc import JobServiceAsyncStub as Stub

EXIT_OK, EXIT_NOT_SUCCEEDED, EXIT_USAGE, EXIT_RPC = 0, 1, 2, 3
# The job states after which nothing more happens (the proto's values, for comparing with a Job).
TERMINAL_STATES = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})

# CANCELLED counts too: a gateway that shuts down ends its streams that way, and a cancel this
# client asked for never arrives here (it surfaces as asyncio.CancelledError instead).
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
RESUME_FOR_SECONDS = 30.0
FIRST_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 4.0
# gRPC's own reconnect backoff grows to two minutes by default, which would keep a channel in
# failure long after the gateway is back; keep it shorter than our resume window.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class UsageError(Exception):
    """Bad command-line input found after parsing (an unreadable file, malformed params)."""


class WatchLost(Exception):
    """The stream kept ending before the job's terminal event for the whole resume window."""


class Display(Protocol):
    def event(self, event: pb.JobEvent) -> None: ...
    def notice(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainDisplay:
    """One line per event, flushed at once so a pipe or a CI log sees progress as it happens."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def event(self, event: pb.JobEvent) -> None:
        print(render.event_line(event), file=self.out, flush=True)
        if is_terminal(event):
            print(render.outcome_line(event), file=self.out, flush=True)

    def notice(self, text: str) -> None:
        print(f"jobstream: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class LiveDisplay:
    """One line redrawn in place; chunk failures and notices scroll above it so none is lost."""

    CLEAR = "\r\x1b[K"

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.message = ""
        self.drawn = False

    def event(self, event: pb.JobEvent) -> None:
        if event.type == pb.CHUNK_FAILED:
            self._above(render.chunk_failure_line(event))
        elif event.message or event.progress.message:
            self.message = event.message or event.progress.message
        # Read every time: the terminal may have been resized since the last event.
        width = shutil.get_terminal_size().columns
        self.out.write(self.CLEAR + render.progress_line(event, width, self.message))
        self.drawn = True
        if is_terminal(event):
            self.out.write("\n" + render.outcome_line(event) + "\n")
            self.drawn = False
        self.out.flush()

    def notice(self, text: str) -> None:
        self._above(f"jobstream: {text}")

    def close(self) -> None:
        """Leaves the cursor on a fresh line when the watch ends early (Ctrl-C, an error)."""
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False

    def _above(self, line: str) -> None:
        self.out.write(self.CLEAR + line + "\n")
        self.out.flush()


def display_for(out: TextIO, *, plain: bool) -> Display:
    return LiveDisplay(out) if not plain and out.isatty() else PlainDisplay(out)


def exit_code(state: int) -> int:
    return EXIT_OK if state == pb.SUCCEEDED else EXIT_NOT_SUCCEEDED


def _outcome_from_job(job: pb.Job) -> pb.JobEvent:
    """A stand-in for a terminal event the stream did not send again (it was already seen)."""
    event = pb.JobEvent(job_id=job.id, seq=job.last_seq, state=job.state, progress=job.progress, error=job.error)
    if job.HasField("result"):
        event.result.CopyFrom(job.result)
    return event


async def follow(stub: Stub, job_id: str, display: Display, after_seq: int = 0) -> pb.JobEvent:
    """Shows the job's events after `after_seq` and returns its terminal event.

    Each event is shown once, in seq order, even across resumes. Raises grpc.aio.AioRpcError when a
    call fails for good (not found, or the gateway unreachable for RESUME_FOR_SECONDS) and WatchLost
    when the stream keeps ending early.
    """
    last = after_seq
    broken_since: float | None = None
    delay = FIRST_BACKOFF_SECONDS
    while True:
        failure: Exception
        try:
            async for event in stub.Watch(pb.WatchRequest(job_id=job_id, after_seq=last)):
                if event.seq <= last:
                    continue
                last, broken_since, delay = event.seq, None, FIRST_BACKOFF_SECONDS
                display.event(event)
                if is_terminal(event):
                    return event
            # A stream that ends without a terminal event either started after it (the caller
            # asked for after_seq = the final seq) or was closed early; the job row tells which.
            job = await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=RESUME_FOR_SECONDS)
            if job.state in TERMINAL_STATES and job.last_seq <= last:
                return _outcome_from_job(job)
            failure = WatchLost(f"the stream ended before job {job_id}'s terminal event (last seq {last})")
            reason = "stream ended early"
        except grpc.aio.AioRpcError as err:
            if err.code() not in RESUMABLE:
                raise
            failure, reason = err, err.code().name
        now = time.monotonic()
        broken_since = now if broken_since is None else broken_since
        if now + delay - broken_since > RESUME_FOR_SECONDS:
            raise failure
        display.notice(f"watch interrupted ({reason}); resuming after seq {last} in {delay:.1f}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)


async def watch_job(stub: Stub, job_id: str, after_seq: int, *, plain: bool, out: TextIO) -> int:
    display = display_for(out, plain=plain)
    try:
        outcome = await follow(stub, job_id, display, after_seq)
    finally:
        display.close()
    if outcome.seq <= after_seq:
        # Nothing new was shown (the job had already ended): still say how it ended.
        print(render.outcome_line(outcome), file=out, flush=True)
    return exit_code(outcome.state)


def build_submit(args: argparse.Namespace) -> pb.SubmitRequest:
    """The request the submit options describe; raises UsageError for bad params or input."""
    try:
        params = render.merge_params(args.params_json, args.param or [])
    except ValueError as err:
        raise UsageError(str(err)) from None
    data = b""
    if args.input == "-":
        data = sys.stdin.buffer.read()
    elif args.input:
        try:
            data = Path(args.input).read_bytes()
        except OSError as err:
            raise UsageError(f"--input: {err.strerror}: {args.input}") from None
    return pb.SubmitRequest(
        kind=args.kind, params=to_struct(params), input=data, idempotency_key=args.idempotency_key or ""
    )


async def submit(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    request = build_submit(args)
    job = (await stub.Submit(request, timeout=args.timeout)).job
    if not args.watch:
        print(job.id, file=out)
        return EXIT_OK
    print(f"submitted job {job.id}", file=out, flush=True)
    return await watch_job(stub, job.id, 0, plain=args.plain, out=out)


async def watch(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    return await watch_job(stub, args.job_id, args.after_seq, plain=args.plain, out=out)


async def cancel(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    request = pb.CancelRequest(job_id=args.job_id, reason=args.reason)
    job = (await stub.Cancel(request, timeout=args.timeout)).job
    print(f"job {job.id} {render.state_name(job.state)} cancel_requested={str(job.cancel_requested).lower()}", file=out)
    return EXIT_OK


async def get(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    job = await stub.GetJob(pb.GetJobRequest(job_id=args.job_id), timeout=args.timeout)
    print(render.job_json(job), file=out)
    return EXIT_OK


async def list_jobs(stub: Stub, args: argparse.Namespace, out: TextIO) -> int:
    jobs: list[pb.Job] = []
    token = ""
    while True:
        request = pb.ListJobsRequest(page_size=args.page_size, page_token=token, state=args.state, kind=args.kind)
        response = await stub.ListJobs(request, timeout=args.timeout)
        jobs.extend(response.jobs)
        token = response.next_page_token
        if not token or not args.all:
            break
    print(render.job_table(jobs), file=out)
    if token:
        # On stderr, so the table on stdout stays a table for scripts.
        print("jobstream: more jobs than shown; --all follows every page", file=sys.stderr)
    return EXIT_OK


Command = Callable[["Stub", argparse.Namespace, TextIO], Awaitable[int]]

COMMANDS: dict[str, Command] = {
    "submit": submit,
    "watch": watch,
    "cancel": cancel,
    "get": get,
    "list": list_jobs,
}


def channel(gateway: str, token: str = "", ca: str = "", cert: str = "", key: str = "") -> grpc.aio.Channel:
    return gateway_channel(gateway, token=token, ca=ca, cert=cert, key=key, options=CHANNEL_OPTIONS)


async def _call(command: Command, args: argparse.Namespace) -> int:
    token = args.token or read_local(DEV_TOKEN_FILE)
    async with channel(args.gateway, token, args.ca, args.cert, args.key) as chan:
        return await command(pb_grpc.JobServiceStub(chan), args, sys.stdout)


def run(args: argparse.Namespace) -> int:
    """Runs one client command: 0 ok, 1 job did not succeed, 2 bad usage, 3 the call failed."""
    try:
        return asyncio.run(_call(COMMANDS[args.command], args))
    except UsageError as err:
        print(f"jobstream: {err}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.aio.AioRpcError as err:
        print(f"jobstream: {err.code().name}: {err.details()}", file=sys.stderr)
        return EXIT_RPC
    except WatchLost as err:
        print(f"jobstream: {err}", file=sys.stderr)
        return EXIT_RPC
