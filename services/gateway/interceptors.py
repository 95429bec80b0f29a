"""The gateway's cross-cutting concerns as a chain of server interceptors.

Order (outermost first): metrics see the final status code of every call; error mapping turns
domain errors into status codes once, so handlers only raise. An unreachable Postgres is
UNAVAILABLE, the code clients retry on, rather than an unexplained UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from jobstream import errors
from jobstream.db import DATABASE_UNAVAILABLE
from services.gateway.metrics import GRPC_LATENCY, GRPC_REQUESTS

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Unary = Callable[[Any, Context], Awaitable[Any]]
Stream = Callable[[Any, Context], AsyncIterator[Any]]
Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes are not the message the method takes.

    gRPC answers a deserializer that raises with UNKNOWN; handing the handler this instead lets the
    call end with INVALID_ARGUMENT and a message that says what was wrong.
    """

    message: str


STATUS_OF: dict[type[errors.JobstreamError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


DATABASE_DOWN = "the job database is unreachable; retry shortly"


def status_of(err: errors.JobstreamError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps unary and server-streaming handlers; subclasses say how."""

    def wrap_unary(self, method: str, inner: Unary) -> Unary:
        return inner

    def wrap_stream(self, method: str, inner: Stream) -> Stream:
        return inner

    def wrap_deserializer(self, deserializer: Deserializer | None) -> Deserializer | None:
        return deserializer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # The stubs type handlers for the sync server only; the aio handlers are coroutines.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(method, handler.unary_unary),
                self.wrap_deserializer(handler.request_deserializer),
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self.wrap_stream(method, handler.unary_stream),
                self.wrap_deserializer(handler.request_deserializer),
                handler.response_serializer,
            )
        return handler


def _decode_safely(deserializer: Deserializer) -> Deserializer:
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "protobuf message"

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as err:
            return Undecodable(f"request: not a valid {name} ({err})")

    return decode


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument(request.message, field="request")


class ErrorMappingInterceptor(WrappingInterceptor):
    def wrap_deserializer(self, deserializer: Deserializer | None) -> Deserializer | None:
        return None if deserializer is None else _decode_safely(deserializer)

    @staticmethod
    async def _fail(method: str, context: Context, err: Exception) -> None:
        """Ends the call with the status `err` means; an error it does not know is logged and
        raised again (gRPC answers UNKNOWN)."""
        if isinstance(err, errors.JobstreamError):
            if isinstance(err, errors.ResourceExhausted) and err.retry_after_seconds is not None:
                context.set_trailing_metadata((("retry-after-seconds", f"{err.retry_after_seconds:.3f}"),))
            await context.abort(status_of(err), err.message)
        if isinstance(err, DATABASE_UNAVAILABLE):
            log.warning("%s: %s: %s", method, DATABASE_DOWN, err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_DOWN)
        log.exception("unexpected error in %s", method)
        raise err

    def wrap_unary(self, method: str, inner: Unary) -> Unary:
        async def unary(request: Any, context: Context) -> Any:
            try:
                _refuse_undecodable(request)
                return await inner(request, context)
            except Exception as err:
                await self._fail(method, context, err)

        return unary

    def wrap_stream(self, method: str, inner: Stream) -> Stream:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                _refuse_undecodable(request)
                async for item in inner(request, context):
                    yield item
            except Exception as err:
                await self._fail(method, context, err)

        return stream


def _code(err: BaseException | None, context: Context) -> str:
    # A stream whose client went away is either interrupted inside the handler (CancelledError)
    # or, when that happens while it waits at a yield, closed by gRPC (GeneratorExit).
    if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if err is None else grpc.StatusCode.UNKNOWN.name


class MetricsInterceptor(WrappingInterceptor):
    @staticmethod
    def _record(method: str, started: float, err: BaseException | None, context: Context) -> None:
        GRPC_REQUESTS.labels(method=method, code=_code(err, context)).inc()
        GRPC_LATENCY.labels(method=method).observe(time.perf_counter() - started)

    def wrap_unary(self, method: str, inner: Unary) -> Unary:
        async def unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            try:
                response = await inner(request, context)
            except BaseException as err:
                self._record(method, started, err, context)
                raise
            self._record(method, started, None, context)
            return response

        return unary

    def wrap_stream(self, method: str, inner: Stream) -> Stream:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for item in inner(request, context):
                    yield item
            except BaseException as err:
                self._record(method, started, err, context)
                raise
            self._record(method, started, None, context)

        return stream
