"""Job and chunk states, and which job states are final.

Job states are the public enum; chunk states exist only in Postgres. Keeping the numbers here
(not scattered as literals in SQL) lets every service agree on them.
"""

from __future__ import annotations

from enum import IntEnum

from jobstream.v1 import jobstream_pb2 as pb


class JobState(IntEnum):
    QUEUED = pb.QUEUED
    RUNNING = pb.RUNNING
    SUCCEEDED = pb.SUCCEEDED
    FAILED = pb.FAILED
    CANCELLED = pb.CANCELLED

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
TERMINAL_EVENT_TYPES = frozenset({pb.JOB_SUCCEEDED, pb.JOB_FAILED, pb.JOB_CANCELLED})


class ChunkState(IntEnum):
    PENDING = 0  # waiting for a worker to claim the current attempt
    RUNNING = 1  # claimed by a worker holding a lease
    SUCCEEDED = 2
    FAILED = 3  # attempts exhausted
    CANCELLED = 4

    @property
    def terminal(self) -> bool:
        return self in (ChunkState.SUCCEEDED, ChunkState.FAILED, ChunkState.CANCELLED)
