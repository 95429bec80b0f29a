"""`jobstream`: submit, watch, cancel, get and list jobs; `up` runs the whole system, `demo` shows it.

Only the argument parsing and the dispatch live here. `up` and `demo` are imported when chosen,
because they pull in Postgres, Kafka and process supervision that client commands never need.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobstream.local_files import DATABASE_URL_FILE, DEV_TOKEN_FILE, STATE_DIR
from jobstream.v1 import jobstream_pb2 as pb

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
MAX_PAGE_SIZE = 1000
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _page_size(text: str) -> int:
    value = _non_negative_int(text)
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_PAGE_SIZE}, got {text}")
    return value


STATES = [name for name in pb.JobState.keys() if name != "JOB_STATE_UNSPECIFIED"]  # noqa: SIM118 (not a dict)


def _state(text: str) -> int:
    name = text.upper()
    if name not in STATES:
        raise argparse.ArgumentTypeError(f"unknown state {text!r} (one of {', '.join(STATES)})")
    return pb.JobState.Value(name)


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # Accepted before and after the subcommand. After it, the defaults are suppressed so that a
    # value given before the subcommand is not overwritten by the subcommand's own default.
    gateway = os.environ.get("JOBSTREAM_GATEWAY") or DEFAULT_GATEWAY
    parser.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        default=gateway if defaults else argparse.SUPPRESS,
        help=f"the gateway to call (default $JOBSTREAM_GATEWAY or {DEFAULT_GATEWAY})",
    )
    for flag, env, metavar, what in (
        (
            "--token",
            "JOBSTREAM_TOKEN",
            "KEY",
            f"API key; without it, the local stack's {STATE_DIR / DEV_TOKEN_FILE} if present",
        ),
        (
            "--ca",
            "JOBSTREAM_CA",
            "FILE",
            "CA certificate (PEM) to verify a TLS gateway with; without it the call is plaintext",
        ),
        ("--cert", "JOBSTREAM_CLIENT_CERT", "FILE", "client certificate (PEM) for a gateway that requires one"),
        ("--key", "JOBSTREAM_CLIENT_KEY", "FILE", "the client certificate's private key (PEM)"),
    ):
        parser.add_argument(
            flag,
            metavar=metavar,
            default=os.environ.get(env, "") if defaults else argparse.SUPPRESS,
            help=f"{what} (default ${env})",
        )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=DEFAULT_TIMEOUT if defaults else argparse.SUPPRESS,
        help=f"deadline of each unary call (default {DEFAULT_TIMEOUT:g}); watching has none",
    )


def _plain_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plain", action="store_true", help="one line per event even on a terminal (always so when piped)"
    )


def _admin_commands(sub: Any) -> None:
    """`tenants` and `keys`: operator commands that talk to Postgres itself, not to the gateway."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        metavar="URL",
        default=os.environ.get("JOBSTREAM_DATABASE_URL", ""),
        help=f"(default $JOBSTREAM_DATABASE_URL, else the local stack's {STATE_DIR / DATABASE_URL_FILE})",
    )
    tenants = sub.add_parser("tenants", help="create and list tenants").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = tenants.add_parser("create", parents=[common], help="create a tenant")
    create.add_argument("tenant", metavar="TENANT", help="its id: lower-case letters, digits and dashes")
    create.add_argument("--name", default="", help="a display name (default the id)")
    tenants.add_parser("list", parents=[common], help="list tenants")

    keys = sub.add_parser("keys", help="create, list and revoke API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", parents=[common], help="create a key and print its token (shown only now)")
    create.add_argument("--tenant", required=True, metavar="TENANT", help="the tenant the key acts as")
    create.add_argument("--name", default="", help="what the key is for")
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key: its next call is refused")
    revoke.add_argument("key_id", metavar="KEY_ID")
    listing = keys.add_parser("list", parents=[common], help="list keys (never their secrets)")
    listing.add_argument("--tenant", default="", metavar="TENANT", help="only this tenant's keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobstream",
        description="Submit jobs, watch their progress live, cancel them.",
        epilog="exit status: 0 ok (and the job succeeded), 1 the job failed or was cancelled, "
        "2 bad usage, 3 the call to the gateway failed",
    )
    _connection_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = sub.add_parser("submit", parents=[common], help="submit a job and print its id")
    submit.add_argument("kind", metavar="KIND", help="the job kind, e.g. demo.sleep or text.wordcount")
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one param; VALUE is read as JSON when it parses (chunks=20 is a number), else as text",
    )
    submit.add_argument("--params-json", metavar="JSON", help="params as one JSON object; --param values override")
    submit.add_argument("--input", metavar="FILE", help="the job's input data; - reads stdin")
    submit.add_argument("--idempotency-key", metavar="KEY", help="submitting again with it returns the same job")
    submit.add_argument("--watch", action="store_true", help="then watch the job until it ends")
    _plain_option(submit)

    watch = sub.add_parser("watch", parents=[common], help="stream a job's events until it ends")
    watch.add_argument("job_id", metavar="ID")
    watch.add_argument(
        "--after-seq", type=_non_negative_int, default=0, metavar="N", help="start with the event after seq N"
    )
    _plain_option(watch)

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.add_argument("--reason", default="", metavar="TEXT", help="recorded with the cancellation")

    get = sub.add_parser("get", parents=[common], help="print a job as JSON")
    get.add_argument("job_id", metavar="ID")

    listing = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument(
        "--state", type=_state, default=pb.JOB_STATE_UNSPECIFIED, metavar="STATE", help=" | ".join(STATES)
    )
    listing.add_argument("--kind", default="", metavar="KIND", help="only jobs of this kind")
    listing.add_argument("--page-size", type=_page_size, default=50, metavar="N", help="jobs per page (default 50)")
    listing.add_argument("--all", action="store_true", help="follow every page, not only the first")

    _admin_commands(sub)

    # Its options belong to up.py, which is imported only when `up` runs; see main().
    sub.add_parser("up", add_help=False, help="run Postgres, the broker and every service here until Ctrl-C")

    demo = sub.add_parser("demo", help="start the system, run two jobs with live progress, stop it")
    demo.add_argument(
        "--state-dir", type=Path, default=Path(".jobstream/demo"), metavar="DIR", help="(default .jobstream/demo)"
    )
    _plain_option(demo)
    return parser


def _run_up(extra: Sequence[str]) -> int:
    from jobstream.cli.up import add_up_arguments, run_up

    parser = argparse.ArgumentParser(
        prog="jobstream up", description="Run Postgres, the broker, the scheduler, the gateway and workers."
    )
    add_up_arguments(parser)
    return run_up(parser.parse_args(extra))


def _dispatch(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "up":
        return _run_up(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("tenants", "keys"):
        from jobstream.cli import admin

        return admin.run(args)
    if args.command == "demo":
        from jobstream.cli.demo import run_demo

        return run_demo(args.state_dir, plain=args.plain)
    from jobstream.cli import client

    return client.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`jobstream list | head`): not an error worth a traceback. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
