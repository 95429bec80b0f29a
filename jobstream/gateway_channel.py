"""A client channel to the gateway that carries an API key on every call.

The key rides as `authorization: Bearer <token>` metadata added by a client interceptor, so it works
on plaintext channels too (gRPC's call credentials insist on TLS) and no call can forget it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]


class _Token:
    """Adds the `authorization` header to a call's metadata."""

    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# gRPC files each interceptor under one kind of call only, so unary and server-streaming calls
# need one each.
class _UnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamToken(_Token, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


def _bearer_interceptors(token: str) -> list[Any]:
    """The interceptors that add `token` to every call."""
    header = ("authorization", f"Bearer {token}")
    return [_UnaryToken(header), _StreamToken(header)]


def spread(address: str, options: ChannelOptions) -> tuple[str, ChannelOptions]:
    """The gRPC target and options for one gateway address or a comma-separated list of them."""
    if "," not in address:
        return address, options
    targets = ",".join(part.strip() for part in address.split(",") if part.strip())
    return f"ipv4:{targets}", (*options, ("grpc.lb_policy_name", "round_robin"))


def gateway_channel(
    address: str,
    *,
    token: str = "",
    ca: str = "",
    cert: str = "",
    key: str = "",
    options: ChannelOptions = (),
) -> grpc.aio.Channel:
    """Plaintext, or TLS verified against the `ca` file (with a client certificate for mTLS); with
    `token`, every call carries it. `address` may list several gateways, comma-separated (IPv4
    host:port): calls are then spread over them round robin, and one that is down is skipped."""
    interceptors = _bearer_interceptors(token) if token else None
    address, options = spread(address, options)
    if not ca:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
