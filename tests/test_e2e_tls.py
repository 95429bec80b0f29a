"""TLS on the gateway: a client that trusts the right CA gets through, one that trusts another CA or
speaks plaintext does not; with a client CA configured, only clients with a certificate it signed do.

Extra gateways with TLS join the shared stack (same Postgres and broker) for the module's tests."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from jobstream.embedded.ports import free_port
from jobstream.gateway_channel import gateway_channel
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.stack import Stack

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(name: str, root: Path) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}"),
        cwd=root,
    )


def _signed(name: str, extensions: str, root: Path) -> None:
    (root / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
        cwd=root,
    )
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"),
        *("-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext"),
        cwd=root,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    _ca("ca", root)
    _ca("other-ca", root)
    _signed("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth", root)
    _signed("client", "extendedKeyUsage=clientAuth", root)
    return Pki(
        root / "ca.crt",
        root / "other-ca.crt",
        root / "server.crt",
        root / "server.key",
        root / "client.crt",
        root / "client.key",
    )


def _tls_gateway(stack: Stack, name: str, pki: Pki, *, client_ca: bool) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    env = {
        "JOBSTREAM_GATEWAY_LISTEN": address,
        "JOBSTREAM_GATEWAY_TLS_CERT": str(pki.server_cert),
        "JOBSTREAM_GATEWAY_TLS_KEY": str(pki.server_key),
        "JOBSTREAM_GATEWAY_TLS_CLIENT_CA": str(pki.ca) if client_ca else "",
    }
    process = stack.start_service(name, "services.gateway", **env)
    try:
        yield address
    finally:
        process.terminate()
        del stack.services[name]


@pytest.fixture(scope="module")
def tls_gateway(stack: Stack, pki: Pki) -> Iterator[str]:
    yield from _tls_gateway(stack, "gateway-tls", pki, client_ca=False)


@pytest.fixture(scope="module")
def mtls_gateway(stack: Stack, pki: Pki) -> Iterator[str]:
    yield from _tls_gateway(stack, "gateway-mtls", pki, client_ca=True)


async def _list(chan: grpc.aio.Channel, within: float = 30) -> grpc.StatusCode:
    """OK once the gateway answers; the handshake's failure code otherwise."""
    try:
        await pb_grpc.JobServiceStub(chan).ListJobs(pb.ListJobsRequest(page_size=1), timeout=within)
    except grpc.aio.AioRpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


@pytest.fixture
async def trusted_call(stack: Stack, tls_gateway: str, pki: Pki) -> AsyncIterator[grpc.aio.Channel]:
    async with gateway_channel(tls_gateway, token=stack.token, ca=str(pki.ca)) as chan:
        await asyncio.wait_for(chan.channel_ready(), 60)
        yield chan


async def test_a_client_trusting_the_ca_gets_through(trusted_call: grpc.aio.Channel) -> None:
    assert await _list(trusted_call) == grpc.StatusCode.OK


async def test_a_client_trusting_another_ca_or_speaking_plaintext_is_refused(
    stack: Stack, trusted_call: grpc.aio.Channel, tls_gateway: str, pki: Pki
) -> None:
    # trusted_call proves the gateway is up, so each refusal below is the handshake's.
    async with gateway_channel(tls_gateway, token=stack.token, ca=str(pki.other_ca)) as wrong_ca:
        assert await _list(wrong_ca, within=3) == grpc.StatusCode.UNAVAILABLE
    async with gateway_channel(tls_gateway, token=stack.token) as plaintext:
        assert await _list(plaintext, within=3) == grpc.StatusCode.UNAVAILABLE


async def test_with_a_client_ca_only_clients_with_its_certificate_get_through(
    stack: Stack, mtls_gateway: str, pki: Pki
) -> None:
    async with gateway_channel(
        mtls_gateway, token=stack.token, ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key)
    ) as with_cert:
        await asyncio.wait_for(with_cert.channel_ready(), 60)
        assert await _list(with_cert) == grpc.StatusCode.OK
    async with gateway_channel(mtls_gateway, token=stack.token, ca=str(pki.ca)) as without_cert:
        assert await _list(without_cert, within=3) == grpc.StatusCode.UNAVAILABLE
