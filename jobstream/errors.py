"""Domain errors, raised where the fact is known and mapped to gRPC status codes in one place.

Services never build gRPC statuses themselves: they raise one of these, and a server interceptor turns
it into the matching code. The message is shown to the client as is, so it must make sense without the
server's logs (name the field, the limit, the value that was refused).
"""

from __future__ import annotations


class JobstreamError(Exception):
    """Base of the errors a client may see; ``message`` is written for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(JobstreamError):
    """The request is malformed (maps to INVALID_ARGUMENT).

    ``field`` is the request field at fault (``"kind"``, ``"input"``, ``"params.chunks"``) so clients
    can point at it without parsing the message; the message names it too.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(JobstreamError):
    """The named job (or other resource) does not exist (maps to NOT_FOUND)."""


class AlreadyExists(JobstreamError):
    """A create with a client-chosen key collided with an existing one (maps to ALREADY_EXISTS)."""


class ResourceExhausted(JobstreamError):
    """A quota or limit refused the request (maps to RESOURCE_EXHAUSTED).

    ``retry_after_seconds`` is set when waiting would help (a rate limit), and left ``None`` when it
    would not (the input is simply too large).
    """

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class PermissionDenied(JobstreamError):
    """The caller is known but may not do this (maps to PERMISSION_DENIED)."""


class Unauthenticated(JobstreamError):
    """The caller could not be identified (maps to UNAUTHENTICATED)."""


class FailedPrecondition(JobstreamError):
    """The request is valid but the current state forbids it, e.g. a finished job (FAILED_PRECONDITION)."""


class ChunkError(Exception):
    """Raised by job-kind code to fail one chunk with a message meant for the job's owner.

    Unlike an arbitrary exception (whose traceback stays in the worker's log), the message is recorded
    as the chunk's failure reason. ``retryable=False`` tells the worker that another attempt cannot
    succeed (the payload itself is bad), so the chunk fails at once instead of using up its retries.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message
