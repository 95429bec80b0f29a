"""The jobstream CLI against the real stack, run as a user runs it: a separate process."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import run_cli
from tests.stack import Stack

pytestmark = pytest.mark.e2e


async def jobstream(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await run_cli(stack, "--token", stack.token, *args)


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
