"""The contract between jobstream and a job kind: what user code implements and what it may rely on.

Who calls what, and why it matters to an implementer:

* the gateway calls ``params.validate``, ``validate_input`` and ``count_chunks`` at Submit, so these
  must be cheap and must raise :class:`~jobstream.errors.InvalidArgument` for a bad request;
* the scheduler calls ``split`` once per job and ``merge`` once at the end; neither may do I/O that
  could block for long, because the scheduler serves many jobs from one event loop;
* the worker calls ``run`` once per chunk attempt, possibly in several processes at once, and possibly
  again for the same chunk after a crash or timeout, so ``run`` must be safe to repeat.

A kind instance is shared by every job of that kind in a process: keep per-job state out of ``self``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

from jobstream.kinds.params import JSON, ParamSpec

__all__ = ["JSON", "ChunkContext", "JobKind", "RetryPolicy"]


class ChunkContext(Protocol):
    """What a running chunk can see and tell; the worker provides it.

    Members are read-only here so that any object with these attributes (a dataclass in tests, the
    worker's own class) fits.
    """

    @property
    def job_id(self) -> str: ...

    @property
    def chunk_index(self) -> int: ...

    @property
    def attempt(self) -> int:
        """1 on the first run of this chunk, then 2, 3, ... on retries."""
        ...

    @property
    def params(self) -> Mapping[str, JSON]:
        """Already validated against the kind's ParamSpec, with defaults filled."""
        ...

    async def report(self, fraction: float, message: str = "") -> None:
        """Progress of this chunk, 0..1. Cheap to call often: the worker coalesces reports."""
        ...

    @property
    def cancelled(self) -> bool:
        """For CPU-bound code that polls between steps; async code is interrupted by task cancellation."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed chunk is run again, and how long to wait between attempts."""

    max_attempts: int = 3
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                "backoff needs 0 <= backoff_initial_s <= backoff_max_s, got "
                f"{self.backoff_initial_s} and {self.backoff_max_s}"
            )
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be at least 1, got {self.backoff_multiplier}")

    def should_retry(self, attempt: int) -> bool:
        """Whether a chunk whose attempt number ``attempt`` just failed gets another attempt."""
        return attempt < self.max_attempts

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt ``attempt`` (1-based) failed, before the next one.

        Full jitter (a uniform draw between 0 and the exponential ceiling) rather than the ceiling
        itself, so that chunks failing together (a shared dependency went down) do not retry together.
        """
        if attempt < 1:
            raise ValueError(f"attempt starts at 1, got {attempt}")
        try:
            ceiling = self.backoff_initial_s * self.backoff_multiplier ** (attempt - 1)
        except OverflowError:
            ceiling = self.backoff_max_s
        ceiling = min(ceiling, self.backoff_max_s)
        uniform = rng.uniform if rng is not None else random.uniform
        return uniform(0.0, ceiling)


class JobKind(ABC):
    """A named way to split, run and merge a job; subclass it and register an instance.

    Class attributes configure how jobstream treats the kind: ``retry`` and ``chunk_timeout_s`` (seconds
    one attempt may run before the worker stops it and counts a failure), ``allow_partial`` (whether a
    job may succeed with failed chunks, merging only the ones that succeeded) and ``max_input_bytes``
    (a limit of the kind's own, applied together with the service-wide one; ``None`` leaves only the
    service limit).
    """

    name: ClassVar[str]
    params: ClassVar[ParamSpec]
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    chunk_timeout_s: ClassVar[float | None] = None
    allow_partial: ClassVar[bool] = False
    max_input_bytes: ClassVar[int | None] = None

    def validate_input(self, params: Mapping[str, JSON], data: bytes) -> None:  # noqa: B027 (optional hook)
        """Refuses input the kind cannot process, at Submit rather than in every chunk.

        Raise InvalidArgument with ``field="input"``. The default accepts anything.
        """

    def count_chunks(self, params: Mapping[str, JSON], data: bytes) -> int:
        """An upper bound on ``len(list(split(params, data)))``, used to refuse too-large jobs at Submit.

        The default splits the input to count; override it when a cheaper bound exists.
        """
        return sum(1 for _ in self.split(params, data))

    @abstractmethod
    def split(self, params: Mapping[str, JSON], data: bytes) -> Iterator[bytes]:
        """Yields chunk payloads in index order; must be deterministic for the same params and data."""

    @abstractmethod
    async def run(self, ctx: ChunkContext, payload: bytes) -> JSON:
        """Runs one chunk and returns its JSON-serialisable result.

        Raise :class:`~jobstream.errors.ChunkError` to fail the chunk with a message for the job's
        owner; any other exception fails it too, with the exception's text.
        """

    @abstractmethod
    def merge(self, params: Mapping[str, JSON], results: Iterable[JSON]) -> JSON:
        """Combines chunk results, given in chunk index order (failed chunks skipped), into a dict."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"
