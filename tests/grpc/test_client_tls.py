"""The client's TLS settings against a real server port with TLS and client certificates."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from memstore_client import TLS, AsyncMemstore, RetryPolicy, Unavailable
from server.config import Config
from server.serving.app import build_server
from server.store import Store

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make certs")
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)


def _signed(folder: Path, name: str, extensions: str) -> None:
    _openssl(
        folder, "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"
    )
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    _openssl(
        folder,
        "req",
        "-x509",
        *_EC,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=memstore-test-ca",
    )
    _signed(folder, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _signed(folder, "client", "extendedKeyUsage=clientAuth\n")
    return folder


@pytest.fixture
async def tls_port(store: Store, certs: Path, clean_db: str) -> AsyncIterator[int]:
    """A server whose second port speaks TLS and requires a client certificate."""
    server, _ = await build_server(Config(host="127.0.0.1", port=0), store)
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield port
    await server.stop(None)


def _tls(certs: Path, *, client_cert: bool = True, server_name: str | None = None) -> TLS:
    return TLS(
        root_certificates=(certs / "ca.pem").read_bytes(),
        certificate_chain=(certs / "client.pem").read_bytes() if client_cert else None,
        private_key=(certs / "client.key").read_bytes() if client_cert else None,
        server_name=server_name,
    )


async def test_mutual_tls_round_trip(tls_port: int, certs: Path) -> None:
    async with AsyncMemstore(f"localhost:{tls_port}", tls=_tls(certs)) as client:
        assert (await client.user.add("tls-user")).user_id == "tls-user"
    # By IP, the certificate's name is given explicitly.
    tls = _tls(certs, server_name="localhost")
    async with AsyncMemstore(f"127.0.0.1:{tls_port}", tls=tls) as client:
        assert (await client.user.get("tls-user")).user_id == "tls-user"


async def test_tls_without_client_certificate_or_trust_fails(tls_port: int, certs: Path) -> None:
    once = RetryPolicy(max_attempts=1)
    for tls in (_tls(certs, client_cert=False), TLS()):
        async with AsyncMemstore(f"localhost:{tls_port}", tls=tls, retry=once, timeout=5) as c:
            with pytest.raises(Unavailable):
                await c.user.get("tls-user")
