"""``demo.sleep``: chunks that only sleep and report progress, with switches to make them misbehave.

It exists to show the system working (``chunks`` x ``ms`` of visible progress) and to let tests
provoke every failure path without special hooks in the services:

* ``fail_attempts=k``: every chunk raises ChunkError on its first k attempts (retries, backoff);
* ``fail_chunks="3,7"``: those chunks fail on every attempt (retries exhausted, partial results);
* ``hang_chunk=i``: chunk i never finishes until cancelled (cancellation, chunk timeouts);
* ``crash_chunk=i``/``crash_attempt=n``: attempt n of chunk i kills the worker process outright
  (lease expiry and re-dispatch after a worker dies).

Faults fire halfway through the chunk, after it has reported progress, so tests also see progress
that was made and then lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator, Mapping

from jobstream.errors import ChunkError, InvalidArgument
from jobstream.kinds.api import JSON, ChunkContext, JobKind
from jobstream.kinds.params import Param, ParamSpec

_log = logging.getLogger(__name__)

# The exit status of a deliberate crash (EX_SOFTWARE), easy to tell apart in test logs.
CRASH_EXIT_CODE = 70
# Progress is reported after each step; long sleeps get more steps so the progress bar moves.
_MAX_STEPS = 20
_MS_PER_STEP = 250


class DemoSleep(JobKind):
    name = "demo.sleep"
    params = ParamSpec(
        Param("chunks", int, default=10, min=1, max=100_000, doc="number of chunks"),
        Param("ms", int, default=100, min=0, max=3_600_000, doc="milliseconds each chunk sleeps"),
        Param("fail_attempts", int, default=0, min=0, max=100, doc="every chunk fails its first N attempts"),
        Param("fail_chunks", str, default="", doc='comma-separated chunk indexes that always fail, e.g. "3,7"'),
        Param("hang_chunk", int, default=-1, min=-1, doc="this chunk sleeps until cancelled (-1: none)"),
        Param("crash_chunk", int, default=-1, min=-1, doc="this chunk exits the worker process (-1: none)"),
        Param("crash_attempt", int, default=1, min=1, doc="the attempt of crash_chunk that crashes"),
    )

    def validate_input(self, params: Mapping[str, JSON], data: bytes) -> None:
        # fail_chunks is free text to the ParamSpec; check its syntax here so a typo is refused at
        # Submit rather than silently failing no chunk.
        parse_indexes(params["fail_chunks"])

    def count_chunks(self, params: Mapping[str, JSON], data: bytes) -> int:
        return int(params["chunks"])

    def split(self, params: Mapping[str, JSON], data: bytes) -> Iterator[bytes]:
        for _ in range(int(params["chunks"])):
            yield b""

    async def run(self, ctx: ChunkContext, payload: bytes) -> JSON:
        params = ctx.params
        ms = int(params["ms"])
        steps = max(2, min(_MAX_STEPS, ms // _MS_PER_STEP))
        for step in range(1, steps + 1):
            if ms:
                await asyncio.sleep(ms / steps / 1000)
            await ctx.report(step / steps)
            if step == steps // 2:
                await self._inject_faults(ctx, step / steps)
        return {"chunk": ctx.chunk_index}

    def merge(self, params: Mapping[str, JSON], results: Iterable[JSON]) -> JSON:
        return {"chunks": sum(1 for _ in results)}

    async def _inject_faults(self, ctx: ChunkContext, progress: float) -> None:
        params, index, attempt = ctx.params, ctx.chunk_index, ctx.attempt
        if index == params["crash_chunk"] and attempt == params["crash_attempt"]:
            _log.warning(
                "demo.sleep crash_chunk: exiting the process (job %s chunk %d attempt %d)",
                ctx.job_id,
                index,
                attempt,
            )
            # os._exit skips cleanup (finally blocks, atexit, broker/database goodbyes) exactly like a
            # killed process, which is what the fault tests need to observe.
            os._exit(CRASH_EXIT_CODE)
        if index in parse_indexes(params["fail_chunks"]):
            raise ChunkError(f"injected failure: chunk {index} is in fail_chunks (attempt {attempt})")
        if attempt <= int(params["fail_attempts"]):
            raise ChunkError(
                f"injected failure: attempt {attempt} of chunk {index} (fail_attempts={params['fail_attempts']})"
            )
        if index == params["hang_chunk"]:
            await ctx.report(progress, "hanging until cancelled (hang_chunk)")
            await asyncio.Event().wait()


def parse_indexes(text: JSON) -> frozenset[int]:
    """Parses ``fail_chunks`` ("3,7", blanks allowed); raises InvalidArgument naming the bad entry."""
    indexes: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if not (part.isascii() and part.isdigit()):
            raise InvalidArgument(
                f'params.fail_chunks: must be comma-separated chunk indexes like "3,7", got {part!r}',
                field="params.fail_chunks",
            )
        indexes.add(int(part))
    return frozenset(indexes)
