"""The jobstream CLI against the real stack, run as a user runs it: a separate process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from jobstream.cli import render
from jobstream.v1 import jobstream_pb2 as pb
from tests.stack import REPO, Stack

pytestmark = pytest.mark.e2e


async def jobstream(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "jobstream.cli.main", "--gateway", stack.gateway_addr, *args]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )


async def test_submit_and_watch_exits_zero_when_the_job_succeeds(stack: Stack) -> None:
    done = await jobstream(stack, "submit", "demo.sleep", "--param", "chunks=4", "--param", "ms=20", "--watch")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted job ")
    assert lines[1].startswith("seq=1 JOB_QUEUED QUEUED")
    assert any(" JOB_SUCCEEDED SUCCEEDED 100.0% 4/4" in line for line in lines)
    assert lines[-1].endswith('SUCCEEDED result={"chunks":4}')


async def test_get_list_watch_and_cancel(stack: Stack) -> None:
    submitted = await jobstream(stack, "submit", "demo.sleep", "--params-json", '{"chunks": 2, "ms": 10}')
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and len(job_id) == 36

    watched = await jobstream(stack, "watch", job_id, "--after-seq", "1")
    got = await jobstream(stack, "get", job_id)
    listed = await jobstream(stack, "list", "--kind", "demo.sleep", "--page-size", "5")
    cancelled = await jobstream(stack, "cancel", job_id)

    assert watched.returncode == 0 and watched.stdout.splitlines()[0].startswith("seq=2 ")
    assert json.loads(got.stdout)["state"] == "SUCCEEDED"
    assert job_id in listed.stdout and listed.stdout.startswith("ID")
    assert cancelled.returncode == 0 and "SUCCEEDED cancel_requested=false" in cancelled.stdout


async def test_exit_codes_for_a_failed_job_an_rpc_error_and_bad_usage(stack: Stack) -> None:
    failed = await jobstream(
        stack, "submit", "demo.sleep", "--params-json", '{"chunks": 2, "fail_chunks": "1"}', "--watch"
    )
    missing = await jobstream(stack, "get", "00000000-0000-4000-8000-000000000000")
    unknown_kind = await jobstream(stack, "submit", "no.such.kind")
    bad_param = await jobstream(stack, "submit", "demo.sleep", "--param", "oops")

    assert failed.returncode == 1 and "FAILED" in failed.stdout.splitlines()[-1]
    assert missing.returncode == 3 and missing.stderr.startswith("jobstream: NOT_FOUND: ")
    assert unknown_kind.returncode == 3 and "INVALID_ARGUMENT" in unknown_kind.stderr
    assert bad_param.returncode == 2 and "KEY=VALUE" in bad_param.stderr


def test_event_line_is_stable_and_greppable() -> None:
    event = pb.JobEvent(
        seq=3,
        type=pb.JOB_PROGRESS,
        state=pb.RUNNING,
        progress=pb.Progress(total_chunks=20, done_chunks=9, percent=45, eta_seconds=1.25),
        message='half "way"',
    )

    assert render.event_line(event) == 'seq=3 JOB_PROGRESS RUNNING 45.0% 9/20 eta 1.2s msg="half \\"way\\""'


def test_progress_line_fits_the_terminal() -> None:
    event = pb.JobEvent(
        state=pb.RUNNING, progress=pb.Progress(total_chunks=4, done_chunks=2, percent=50), message="x" * 500
    )

    line = render.progress_line(event, width=60)

    assert len(line) == 59 and line.startswith("[############------------]  50.0% 2/4 chunks")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("chunks=20", ("chunks", 20)), ("name=abc", ("name", "abc")), ("x=[1,2]", ("x", [1, 2])), ("e=", ("e", ""))],
)
def test_param_values_are_json_when_they_parse(text: str, expected: tuple[str, object]) -> None:
    assert render.parse_param(text) == expected


def test_eta_reads_naturally() -> None:
    assert [render.eta(s) for s in (0, 3.14, 75, 7300)] == ["-", "3.1s", "1m15s", "2h01m"]
