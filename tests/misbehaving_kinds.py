"""A job kind whose chunks misbehave on purpose, loaded into a test stack with
JOBSTREAM_KIND_MODULES=tests.misbehaving_kinds (every service loads it, as with any user kind)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from jobstream.kinds import register
from jobstream.kinds.api import JSON, ChunkContext, JobKind, RetryPolicy
from jobstream.kinds.params import Param, ParamSpec

# finish_despite_cancel's work, and its wait for the release file: a minute each, in steps.
STEPS = 1200
STEP_SECONDS = 0.05


@register
class Misbehave(JobKind):
    name = "test.misbehave"
    params = ParamSpec(
        Param(
            "how",
            str,
            required=True,
            choices=("raise", "unserialisable", "oversized", "snoop", "finish_despite_cancel", "ok"),
        ),
        Param("release", str, doc="finish_despite_cancel: the file whose creation lets it return"),
    )
    retry = RetryPolicy(max_attempts=2, backoff_initial_s=0, backoff_max_s=0)

    def count_chunks(self, params: Mapping[str, JSON], data: bytes) -> int:
        return 1

    def split(self, params: Mapping[str, JSON], data: bytes) -> Iterator[bytes]:
        yield b""

    async def run(self, ctx: ChunkContext, payload: bytes) -> JSON:
        how = ctx.params["how"]
        if how == "raise":
            raise RuntimeError("the kind's own bug")
        if how == "unserialisable":
            return {"value": object()}  # the point of the test
        if how == "oversized":
            return {"blob": "x" * (5 * 1024 * 1024)}
        if how == "snoop":
            # What a kind can reach through its context: its public members, nothing else.
            members = sorted(name for name in dir(ctx) if not name.startswith("_"))
            return {"members": members, "referents": sorted({type(r).__name__ for r in gc.get_referents(ctx)})}
        if how == "finish_despite_cancel":
            # Code that catches the interruption and returns a result anyway, once the test has
            # seen the job cancelled and created the `release` file. Its success is then reported
            # after the job ended, as happens to a chunk whose work finishes just before the cancel
            # reaches it. It works in steps, reporting each (the worker passes on what its pacing
            # allows), for at most a minute.
            release = Path(str(ctx.params["release"]))
            try:
                for step in range(STEPS):
                    await ctx.report(step / STEPS, "running")
                    await asyncio.sleep(STEP_SECONDS)
            except asyncio.CancelledError:
                for _ in range(STEPS):
                    if await asyncio.to_thread(release.exists):
                        return {"finished": "despite the cancel"}
                    await asyncio.sleep(STEP_SECONDS)
                raise
        return {"ok": True}

    def merge(self, params: Mapping[str, JSON], results: Iterable[JSON]) -> JSON:
        return {"chunks": list(results)}
