"""Zep's REST API over TLS: the gRPC port's certificate serves HTTPS, and mTLS holds there too."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.config import Config
from server.serving.app import build_http
from server.serving.tls import SecurityConfig
from server.store import Store
from tests.security.test_tls import Pki, pki  # noqa: F401 (the module's PKI fixture)


async def _serve(store: Store, security: SecurityConfig) -> AsyncIterator[str]:
    config = Config(host="127.0.0.1", http_port=0, embedder="none", security=security)
    server = await build_http(config, store)
    await server.start()
    yield f"https://127.0.0.1:{server.port}"
    await server.stop(None)


@pytest.fixture
async def https_url(pki: Pki, store: Store, clean_db: str) -> AsyncIterator[str]:  # noqa: F811
    sec = SecurityConfig(tls_cert=pki.files["server.pem"], tls_key=pki.files["server.key"])
    async for url in _serve(store, sec):
        yield url


@pytest.fixture
async def mtls_url(pki: Pki, store: Store, clean_db: str) -> AsyncIterator[str]:  # noqa: F811
    sec = SecurityConfig(
        tls_cert=pki.files["server.pem"],
        tls_key=pki.files["server.key"],
        tls_client_ca=pki.files["ca.pem"],
    )
    async for url in _serve(store, sec):
        yield url


def _context(pki: Pki, tmp_path: Path, cert: str | None = None) -> ssl.SSLContext:  # noqa: F811
    context = ssl.create_default_context(cadata=pki.ca.cert.decode())
    if cert is not None:
        pem = getattr(pki, cert)
        (tmp_path / "c.pem").write_bytes(pem.cert)
        (tmp_path / "c.key").write_bytes(pem.key)
        context.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    return context


async def test_https_serves_and_plain_http_is_refused(
    https_url: str,
    pki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(verify=_context(pki, tmp_path)) as client:
        made = await client.post(f"{https_url}/api/v2/users", json={"user_id": "tls"})
        assert made.status_code == 201
        assert (await client.get(f"{https_url}/api/v2/users/tls")).json()["user_id"] == "tls"
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(https_url.replace("https://", "http://") + "/healthz")


async def test_mtls_needs_a_client_certificate_of_the_ca(
    mtls_url: str,
    pki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(verify=_context(pki, tmp_path, "client")) as client:
        assert (await client.get(f"{mtls_url}/healthz")).text == "."
    for cert in (None, "stranger"):
        async with httpx.AsyncClient(verify=_context(pki, tmp_path, cert)) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(f"{mtls_url}/healthz")
