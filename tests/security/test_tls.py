"""TLS and mTLS with a throwaway CA: trusted clients get in, a client without a cert does not."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc
from server.config import Config
from server.serving.app import build_server
from server.serving.tls import SecurityConfig, server_credentials
from server.store import Store
from tests.processes import MEMSTORE, ROOT, free_port, stop_memstore


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, as PEM bytes."""

    cert: bytes
    key: bytes


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif issuer is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _pem(pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Pem:
    return Pem(
        pair[0].public_bytes(serialization.Encoding.PEM),
        pair[1].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass(frozen=True)
class Pki:
    """A CA, a server and a client certificate it signed, and a client of a stranger CA."""

    ca: Pem
    server: Pem
    client: Pem
    stranger: Pem
    files: dict[str, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Throwaway certificates, written to files the server reads."""
    ca = _issue("memstore test CA", None)
    other_ca = _issue("some other CA", None)
    made = Pki(
        ca=_pem(ca),
        server=_pem(_issue("memstore server", ca, server=True)),
        client=_pem(_issue("memstore client", ca)),
        stranger=_pem(_issue("stranger client", other_ca)),
        files={},
    )
    folder = tmp_path_factory.mktemp("pki")
    for name, data in (
        ("ca.pem", made.ca.cert),
        ("server.pem", made.server.cert),
        ("server.key", made.server.key),
    ):
        (folder / name).write_bytes(data)
        made.files[name] = folder / name
    return made


async def serve_memstore(store: Store, security: SecurityConfig) -> tuple[grpc.aio.Server, int]:
    server, port = await build_server(Config(host="127.0.0.1", port=0, security=security), store)
    await server.start()
    return server, port


@pytest.fixture
async def tls_port(pki: Pki, store: Store, clean_db: str) -> AsyncIterator[int]:
    """A TLS server (no client certificates asked) over the run's open-mode store."""
    sec = SecurityConfig(tls_cert=pki.files["server.pem"], tls_key=pki.files["server.key"])
    server, port = await serve_memstore(store, sec)
    yield port
    await server.stop(None)


@pytest.fixture
async def mtls_port(pki: Pki, store: Store, clean_db: str) -> AsyncIterator[int]:
    """A server that requires client certificates signed by the test CA."""
    sec = SecurityConfig(
        tls_cert=pki.files["server.pem"],
        tls_key=pki.files["server.key"],
        tls_client_ca=pki.files["ca.pem"],
    )
    server, port = await serve_memstore(store, sec)
    yield port
    await server.stop(None)


async def _create_and_get(channel: grpc.aio.Channel, user_id: str) -> str:
    users = user_service_pb2_grpc.UserServiceStub(channel)
    await users.CreateUser(us.CreateUserRequest(user_id=user_id), timeout=10)
    got = await users.GetUser(us.GetUserRequest(user_id=user_id), timeout=10)
    return got.user.user_id


async def _refused(channel: grpc.aio.Channel) -> None:
    users = user_service_pb2_grpc.UserServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.ListUsers(us.ListUsersRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_serves_a_client_that_trusts_the_ca(pki: Pki, tls_port: int) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    async with grpc.aio.secure_channel(f"localhost:{tls_port}", creds) as channel:
        assert await _create_and_get(channel, "over-tls") == "over-tls"
    # A plaintext client gets no answer from a TLS port.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_port}") as channel:
        await _refused(channel)
    # Nor does a client that does not trust the server's CA.
    stranger = grpc.ssl_channel_credentials(root_certificates=pki.stranger.cert)
    async with grpc.aio.secure_channel(f"localhost:{tls_port}", stranger) as channel:
        await _refused(channel)


async def test_mtls_serves_a_client_with_a_certificate_of_the_ca(pki: Pki, mtls_port: int) -> None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=pki.client.key,
        certificate_chain=pki.client.cert,
    )
    async with grpc.aio.secure_channel(f"localhost:{mtls_port}", creds) as channel:
        assert await _create_and_get(channel, "over-mtls") == "over-mtls"


async def test_mtls_refuses_a_client_without_a_certificate(pki: Pki, mtls_port: int) -> None:
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    async with grpc.aio.secure_channel(f"localhost:{mtls_port}", no_cert) as channel:
        await _refused(channel)
    # A certificate signed by another CA is no better.
    stranger = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=pki.stranger.key,
        certificate_chain=pki.stranger.cert,
    )
    async with grpc.aio.secure_channel(f"localhost:{mtls_port}", stranger) as channel:
        await _refused(channel)


def test_tls_settings_must_come_in_pairs(pki: Pki) -> None:
    with pytest.raises(RuntimeError, match="both"):
        server_credentials(SecurityConfig(tls_cert=pki.files["server.pem"]))
    with pytest.raises(RuntimeError, match="--tls-client-ca needs"):
        server_credentials(SecurityConfig(tls_client_ca=pki.files["ca.pem"]))
    assert server_credentials(SecurityConfig()) is None


def test_files_that_are_not_a_certificate_and_its_key_are_named(pki: Pki, tmp_path: Path) -> None:
    # gRPC took them and failed to bind: "Failed to bind to address localhost:50051; set
    # GRPC_VERBOSITY=debug ...", which sent the operator looking for who held the port.
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n")
    stranger_key = tmp_path / "stranger.key"
    stranger_key.write_bytes(pki.stranger.key)
    files = pki.files
    for cert, key in (
        (text, text),
        (files["server.pem"], text),
        (files["server.pem"], stranger_key),  # another certificate's key
    ):
        with pytest.raises(RuntimeError, match="--tls-cert and --tls-key are not a PEM") as got:
            server_credentials(SecurityConfig(tls_cert=cert, tls_key=key))
        assert str(cert) in str(got.value) and str(key) in str(got.value)
    with pytest.raises(RuntimeError, match=r"--tls-client-ca .* holds no PEM certificate"):
        server_credentials(
            SecurityConfig(
                tls_cert=files["server.pem"], tls_key=files["server.key"], tls_client_ca=text
            )
        )


def test_tls_errors_name_the_variables_that_set_the_files(pki: Pki, tmp_path: Path) -> None:
    # Set by MEMSTORE_TLS_*, the files were still named by their flags, which the operator
    # never typed; a missing file was "[Errno 2] No such file or directory", naming neither.
    from_env = frozenset({"tls_cert", "tls_key", "tls_client_ca"})
    with pytest.raises(RuntimeError, match=r"^MEMSTORE_TLS_CLIENT_CA needs MEMSTORE_TLS_CERT and"):
        server_credentials(SecurityConfig(tls_client_ca=pki.files["ca.pem"], set_by_env=from_env))
    missing = tmp_path / "gone.pem"
    cases = [(set(), "--tls-key"), (from_env, "MEMSTORE_TLS_KEY")]
    for set_by_env, named in cases:
        config = SecurityConfig(
            tls_cert=pki.files["server.pem"], tls_key=missing, set_by_env=frozenset(set_by_env)
        )
        with pytest.raises(RuntimeError, match=f"^{named} {missing} cannot be read"):
            server_credentials(config)
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n")
    config = SecurityConfig(tls_cert=text, tls_key=text, set_by_env=frozenset({"tls_key"}))
    with pytest.raises(RuntimeError, match=r"^--tls-cert and MEMSTORE_TLS_KEY are not a PEM"):
        server_credentials(config)


def test_serve_command_with_mtls_flags(pki: Pki, clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    port = free_port()
    files = pki.files
    proc = subprocess.Popen(
        [
            *MEMSTORE,
            "serve",
            "--host=127.0.0.1",
            f"--port={port}",
            "--purge-interval=0",
            f"--tls-cert={files['server.pem']}",
            f"--tls-key={files['server.key']}",
            f"--tls-client-ca={files['ca.pem']}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with_cert = grpc.ssl_channel_credentials(
            pki.ca.cert, private_key=pki.client.key, certificate_chain=pki.client.cert
        )
        with grpc.secure_channel(f"localhost:{port}", with_cert) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the TLS server never answered"
                    time.sleep(0.1)
        no_cert = grpc.ssl_channel_credentials(pki.ca.cert)
        with grpc.secure_channel(f"localhost:{port}", no_cert) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out
