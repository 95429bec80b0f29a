"""`jobstream demo` (what `make demo` runs): the whole system on this machine, two jobs, a clean stop.

It starts `jobstream up` as a child, runs a `demo.sleep` job while showing its live progress, counts
the words of a generated text with `text.wordcount` and checks the answer against a local count,
then stops the child with SIGTERM. Exit 0 only when both jobs succeeded and `up` stopped cleanly,
so CI can run it as a smoke test.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc

from jobstream.cli import client, render
from jobstream.embedded.ports import free_port
from jobstream.embedded.procs import ChildProcess
from jobstream.events import from_struct, to_struct
from jobstream.local_files import DEV_TOKEN_FILE, read_local
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from jobstream.v1.jobstream_pb2_grpc import JobServiceAsyncStub as Stub

WORKERS = 2
SLEEP_CHUNKS = 24
SLEEP_MS = 400
READY_TIMEOUT_S = 120.0
# `up` gives each group of services its drain time in turn, then stops the broker and Postgres.
STOP_TIMEOUT_S = 150.0
TEXT_LINES = 4000
TEXT_CHUNK_BYTES = 32 * 1024
TOP_WORDS = 5
VOCABULARY = (
    *("the", "job", "stream", "event", "chunk", "worker", "gateway", "scheduler", "kafka", "postgres"),
    *("progress", "watch", "cancel", "retry", "seq", "lease", "partition", "offset", "commit", "replay"),
)


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _fail(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    job_id: str
    state: int
    seconds: float
    result: dict[str, Any]


def run_demo(state_dir: Path, *, plain: bool) -> int:
    """Runs the demo end to end; returns the process exit status."""
    gateway_listen = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="jobstream-demo-") as tmp:
        ready_file = Path(tmp) / "gateway"
        up = ChildProcess(
            "up",
            [
                sys.executable, "-m", "jobstream.cli.main", "up",
                "--workers", str(WORKERS),
                "--state-dir", str(state_dir),
                "--gateway-listen", gateway_listen,
                "--ready-file", str(ready_file),
            ],
            log_path=state_dir / "up.log",
        )  # fmt: skip
        _say(f"starting Postgres, the broker, a scheduler, a gateway and {WORKERS} workers (log {up.log_path})")
        started = time.monotonic()
        summary: str | None = None
        # A SIGTERM to the demo (a CI timeout) must still stop `up` through the finally below.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            up.start()
            gateway = _wait_ready(up, ready_file)
            if gateway is None:
                return 1
            _say(f"up in {time.monotonic() - started:.1f}s; gateway {gateway}")
            token = read_local(DEV_TOKEN_FILE, state_dir)
            summary = asyncio.run(_jobs(gateway, token, plain=plain))
        except (grpc.aio.AioRpcError, client.WatchLost) as err:
            detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.aio.AioRpcError) else str(err)
            _fail(f"a call to the gateway failed: {detail} (logs in {state_dir / 'logs'})")
        finally:
            stopped = _stop(up)
            signal.signal(signal.SIGTERM, previous)
        if summary is None or not stopped:
            return 1
        _say(summary)
        return 0


def _wait_ready(up: ChildProcess, ready_file: Path) -> str | None:
    """The gateway address once `up` reports ready; None (after saying why) if it dies or is too slow."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            address = next(iter(ready_file.read_text().split()), "")
        except FileNotFoundError:
            address = ""
        if address:
            return address
        if not up.alive:
            _fail(f"jobstream up exited {up.returncode} before it was ready; its log ends:\n{up.log_tail(40)}")
            return None
        if time.monotonic() > deadline:
            _fail(f"jobstream up was not ready after {READY_TIMEOUT_S:.0f}s; its log ends:\n{up.log_tail(40)}")
            return None
        time.sleep(0.1)


def _stop(up: ChildProcess) -> bool:
    """Stops `up` with SIGTERM (SIGKILL only past the timeout); True when it exited 0."""
    was_running = up.alive
    if was_running:
        _say("stopping jobstream up")
    code = up.terminate(STOP_TIMEOUT_S)
    if code != 0 and was_running:
        _fail(f"jobstream up exited {code} while stopping; its log ends:\n{up.log_tail(20)}")
        return False
    return True


async def _jobs(gateway: str, token: str, *, plain: bool) -> str | None:
    """Runs both jobs; the final summary line when both succeeded, else None (after saying why)."""
    async with client.channel(gateway, token) as chan:
        stub = pb_grpc.JobServiceStub(chan)
        _say(f"demo.sleep: {SLEEP_CHUNKS} chunks of {SLEEP_MS} ms on {WORKERS} workers")
        sleep = await _run(stub, "demo.sleep", {"chunks": SLEEP_CHUNKS, "ms": SLEEP_MS}, b"", plain=plain)
        if sleep.state != pb.SUCCEEDED:
            _fail(f"job {sleep.job_id} ended {render.state_name(sleep.state)}")
            return None
        text = _generate_text()
        _say(f"text.wordcount: {len(text) // 1024} KiB of generated text in {TEXT_CHUNK_BYTES // 1024} KiB chunks")
        params = {"chunk_bytes": TEXT_CHUNK_BYTES, "top": TOP_WORDS}
        count = await _run(stub, "text.wordcount", params, text, plain=plain)
        if count.state != pb.SUCCEEDED or not _report_words(count, text):
            return None
    return (
        f"job {sleep.job_id} {render.state_name(sleep.state)} in {sleep.seconds:.1f}s "
        f"({SLEEP_CHUNKS} chunks on {WORKERS} workers); wordcount job {count.job_id} "
        f"{render.state_name(count.state)} in {count.seconds:.1f}s"
    )


async def _run(stub: Stub, kind: str, params: dict[str, Any], data: bytes, *, plain: bool) -> Outcome:
    started = time.monotonic()
    request = pb.SubmitRequest(kind=kind, params=to_struct(params), input=data)
    job = (await stub.Submit(request, timeout=30)).job
    _say(f"submitted job {job.id}")
    display = client.display_for(sys.stdout, plain=plain)
    try:
        outcome = await client.follow(stub, job.id, display)
    finally:
        display.close()
    return Outcome(job.id, outcome.state, time.monotonic() - started, from_struct(outcome.result))


def _generate_text() -> bytes:
    """Deterministic text with a skewed word frequency, so the top words are clear winners."""
    rng = random.Random(20240501)
    weights = [1.0 / (rank + 1) for rank in range(len(VOCABULARY))]
    lines = (" ".join(rng.choices(VOCABULARY, weights, k=rng.randint(6, 14))).capitalize() for _ in range(TEXT_LINES))
    return ("\n".join(lines) + "\n").encode()


def _report_words(outcome: Outcome, text: bytes) -> bool:
    """Prints the job's answer and whether it matches counting the same text here in one pass."""
    words = re.findall(r"\w+", text.decode().casefold())
    result = outcome.result
    top = [(entry["word"], entry["count"]) for entry in result.get("top", [])]
    shown = ", ".join(f"{word} {count}" for word, count in top)
    _say(f"{result.get('words')} words in {result.get('lines')} lines; top words: {shown}")
    local_top = sorted(Counter(words).items(), key=lambda wc: (-wc[1], wc[0]))[:TOP_WORDS]
    if result.get("words") != len(words) or top != local_top:
        _fail(f"the job's counts differ from a local count: {len(words)} words, top {local_top}")
        return False
    _say("the counts match a local count of the same text")
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
