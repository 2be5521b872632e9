"""Security settings (TLS, --insecure, key cache, pool queue) and the listening port they shape."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """The security part of Config; see README "Authentication and TLS"."""

    #: Serve without authentication on a non-loopback address (no API key exists).
    insecure: bool = False
    #: PEM certificate chain and private key: serve TLS when both are set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: PEM CA bundle: require client certificates signed by it (mTLS).
    tls_client_ca: Path | None = None
    #: Seconds a checked key stays trusted: a revoked key stops working within this bound.
    key_cache_seconds: float = 2.0
    #: Calls that may queue for a pooled connection; past it they fail with RESOURCE_EXHAUSTED.
    pool_max_waiting: int = 64


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _path(name: str) -> Path | None:
    value = _env(name)
    return Path(value) if value else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the security flags, each defaulting to its environment variable."""
    d = SecurityConfig()
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=_env("MEMSTORE_INSECURE") in ("1", "true", "on"),
        help="serve without API keys on a non-loopback address (refused otherwise)",
    )
    parser.add_argument("--tls-cert", type=Path, default=_path("MEMSTORE_TLS_CERT"))
    parser.add_argument("--tls-key", type=Path, default=_path("MEMSTORE_TLS_KEY"))
    parser.add_argument("--tls-client-ca", type=Path, default=_path("MEMSTORE_TLS_CLIENT_CA"))
    parser.add_argument(
        "--key-cache-seconds",
        type=float,
        default=float(_env("MEMSTORE_KEY_CACHE_SECONDS") or d.key_cache_seconds),
    )
    parser.add_argument(
        "--pool-max-waiting",
        type=int,
        default=int(_env("MEMSTORE_POOL_MAX_WAITING") or d.pool_max_waiting),
    )


def from_arguments(args: argparse.Namespace) -> SecurityConfig:
    """The SecurityConfig of parsed flags."""
    return SecurityConfig(
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        key_cache_seconds=args.key_cache_seconds,
        pool_max_waiting=args.pool_max_waiting,
    )


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only.

    Only "localhost" and literal loopback addresses count; any other name might resolve
    to a public address, so it is treated as non-loopback (the safe side).
    """
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reflection_enabled(setting: bool | None, host: str) -> bool:
    """Reflection as configured; unset means on for a loopback bind, off otherwise."""
    return is_loopback(host) if setting is None else setting


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS with a client CA) credentials; None for plaintext.

    Raises:
        RuntimeError: only one of the certificate and key is set, or a client CA without them.
        OSError: a PEM file cannot be read.
    """
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise RuntimeError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise RuntimeError("TLS needs both --tls-cert and --tls-key")
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        # With a client CA, a client without a certificate signed by it is refused in the
        # TLS handshake, before any RPC runs.
        require_client_auth=client_ca is not None,
    )


def add_port(server: grpc.aio.Server, address: str, config: SecurityConfig) -> int:
    """Binds `address` with TLS when configured; returns the port (0 when binding failed)."""
    credentials = server_credentials(config)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
