"""The status code the gateway's metrics count for a call, from how the handler ended."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from services.gateway.interceptors import _code


class _Ended:
    """The one thing _code asks of a call's context: the code it was ended with, if any."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code


def _counted(err: BaseException | None, code: grpc.StatusCode | None = None) -> str:
    context: Any = _Ended(code)
    return _code(err, context)


def test_a_stream_closed_or_interrupted_because_its_client_left_counts_as_cancelled() -> None:
    assert _counted(GeneratorExit()) == "CANCELLED"
    assert _counted(asyncio.CancelledError()) == "CANCELLED"


def test_other_endings() -> None:
    assert _counted(None) == "OK"
    assert _counted(grpc.aio.AbortError(), grpc.StatusCode.NOT_FOUND) == "NOT_FOUND"
    assert _counted(RuntimeError("boom")) == "UNKNOWN"
