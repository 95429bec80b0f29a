"""`jobstream`: submit, watch, cancel, get and list jobs; `up` and `demo` run the embedded stack."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TextIO

import grpc

from jobstream.cli import client
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from jobstream.v1.jobstream_pb2_grpc import JobServiceAsyncStub as Stub

Command = Callable[["Stub", argparse.Namespace, TextIO], Awaitable[int]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobstream", description=__doc__)
    parser.add_argument(
        "--gateway",
        default=os.environ.get("JOBSTREAM_GATEWAY", "127.0.0.1:50051"),
        help="gateway address (default $JOBSTREAM_GATEWAY or 127.0.0.1:50051)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for each unary call")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="submit a job")
    submit.add_argument("kind")
    submit.add_argument("--param", action="append", metavar="KEY=VALUE", help="a param; VALUE is JSON when it parses")
    submit.add_argument("--params-json", metavar="JSON", help="all params as one JSON object")
    submit.add_argument("--input", metavar="FILE", help="the job's input (- for stdin)")
    submit.add_argument("--idempotency-key", metavar="KEY")
    submit.add_argument("--watch", action="store_true", help="watch the job until it ends")
    submit.add_argument("--plain", action="store_true", help="one line per event even on a terminal")

    watch = sub.add_parser("watch", help="stream a job's events until it ends")
    watch.add_argument("job_id")
    watch.add_argument("--after-seq", type=int, default=0, metavar="N", help="start after event N")
    watch.add_argument("--plain", action="store_true", help="one line per event even on a terminal")

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="")

    get = sub.add_parser("get", help="show a job as JSON")
    get.add_argument("job_id")

    listing = sub.add_parser("list", help="list jobs, newest first")
    states = [n.lower() for n in pb.JobState.keys() if n != "JOB_STATE_UNSPECIFIED"]  # noqa: SIM118 (not a dict)
    listing.add_argument("--state", choices=states)
    listing.add_argument("--kind")
    listing.add_argument("--page-size", type=int, default=50)
    listing.add_argument("--all", action="store_true", help="follow every page")

    from jobstream.cli.up import add_up_arguments

    add_up_arguments(sub.add_parser("up", help="run the embedded stack until Ctrl-C"))
    sub.add_parser("demo", help="start the stack, run demo jobs with live progress, stop")
    return parser


COMMANDS: dict[str, Command] = {
    "submit": client.submit,
    "watch": lambda stub, args, out: client.watch(stub, args.job_id, args.after_seq, plain=args.plain, out=out),
    "cancel": client.cancel,
    "get": client.get,
    "list": client.list_jobs,
}


async def _call(command: Command, args: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(args.gateway) as channel:
        return await command(pb_grpc.JobServiceStub(channel), args, sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        from jobstream.cli.up import run_up

        return run_up(args)
    if args.command == "demo":
        from jobstream.cli.demo import run_demo

        return run_demo()
    try:
        return asyncio.run(_call(COMMANDS[args.command], args))
    except client.UsageError as err:
        print(f"jobstream: {err}", file=sys.stderr)
        return client.EXIT_USAGE
    except grpc.aio.AioRpcError as err:
        print(f"jobstream: {err.code().name}: {err.details()}", file=sys.stderr)
        return client.EXIT_RPC
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
