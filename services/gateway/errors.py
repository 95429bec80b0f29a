"""The one place where domain errors become gRPC status codes.

Handlers raise jobstream.errors types where the fact is known; this interceptor maps them, so no
handler builds a status by hand and an unexpected exception is logged with its method once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from jobstream import errors

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.JobstreamError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(err: errors.JobstreamError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: errors.JobstreamError) -> None:
    if isinstance(err, errors.ResourceExhausted) and err.retry_after_seconds is not None:
        context.set_trailing_metadata((("retry-after-seconds", f"{err.retry_after_seconds:.3f}"),))
    await context.abort(status_of(err), err.message)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # The stubs type handlers for the sync server only; the aio handlers are coroutines.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return await inner(request, context)
                except errors.JobstreamError as err:
                    await _abort(context, err)
                except Exception:
                    log.exception("unexpected error in %s", method)
                    raise

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except errors.JobstreamError as err:
                    await _abort(context, err)
                except Exception:
                    log.exception("unexpected error in %s", method)
                    raise

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
