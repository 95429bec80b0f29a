"""`jobstream demo` (and `make demo`): start the embedded stack, run two jobs while showing their
live progress, stop everything. Exits 0 only when both jobs succeeded and the stack stopped cleanly."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from jobstream.cli import client
from jobstream.embedded.ports import free_port
from jobstream.embedded.procs import ChildProcess
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from jobstream.v1.jobstream_pb2_grpc import JobServiceAsyncStub as Stub

STATE_DIR = Path(".jobstream/demo")
READY_TIMEOUT_S = 120.0
WORKERS = 2
SLEEP_CHUNKS = 24


def run_demo() -> int:
    gateway = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        ready_file = Path(tmp) / "ready"
        up = ChildProcess(
            "up",
            [
                sys.executable, "-m", "jobstream.cli.main", "up",
                "--workers", str(WORKERS),
                "--state-dir", str(STATE_DIR),
                "--gateway-listen", gateway,
                "--ready-file", str(ready_file),
            ],
            log_path=STATE_DIR / "up.log",
        )  # fmt: skip
        print(f"demo: starting Postgres, the broker, a gateway, a scheduler and {WORKERS} workers ...", flush=True)
        up.start()
        try:
            if not _wait_ready(up, ready_file):
                return 1
            succeeded = asyncio.run(_jobs(gateway))
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(timeout=60)
        print(f"demo: stack stopped (exit {code})")
        return 0 if succeeded and code == 0 else 1


def _wait_ready(up: ChildProcess, ready_file: Path) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready_file.exists():
        if not up.alive or time.monotonic() > deadline:
            print(f"demo: the stack did not start:\n{up.log_tail(40)}", file=sys.stderr)
            return False
        time.sleep(0.1)
    return True


async def _jobs(gateway: str) -> bool:
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        sleep_ok = await _run(
            stub, "demo.sleep", f"{SLEEP_CHUNKS} chunks of 400 ms on {WORKERS} workers", chunks=SLEEP_CHUNKS, ms=400
        )
        rng = random.Random(1)
        vocabulary = ["kafka", "postgres", "grpc", "stream", "job", "chunk", "worker", "watch"]
        text = "\n".join(" ".join(rng.choices(vocabulary, k=12)) for _ in range(5_000)).encode()
        count_ok = await _run(stub, "text.wordcount", f"{len(text)} bytes of text", text, chunk_bytes=32 * 1024, top=3)
        return sleep_ok and count_ok


async def _run(stub: Stub, kind: str, what: str, data: bytes = b"", **params: object) -> bool:
    args = argparse.Namespace(
        kind=kind, params_json=None, param=[f"{k}={v}" for k, v in params.items()], input=None,
        idempotency_key="", watch=True, plain=False, timeout=30.0,
    )  # fmt: skip
    request = client.build_submit(args)
    request.input = data
    started = time.monotonic()
    job = (await stub.Submit(request)).job
    print(f"demo: {kind} job {job.id}: {what}", flush=True)
    code = await client.watch(stub, job.id, 0, plain=False, out=sys.stdout)
    final = await stub.GetJob(pb.GetJobRequest(job_id=job.id))
    print(f"demo: {kind} job {job.id} {pb.JobState.Name(final.state)} in {time.monotonic() - started:.1f}s", flush=True)
    return code == client.EXIT_OK
