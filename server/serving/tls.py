"""TLS credentials from the security settings, and the listening port they shape."""

from __future__ import annotations

import ipaddress
import ssl

import grpc

from server.config import SecurityConfig


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
        RuntimeError: only one of the certificate and key is set, or a client CA without
            them; the files are not a PEM certificate chain and its key, or a PEM CA bundle.
        OSError: a PEM file cannot be read.
    """
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise RuntimeError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise RuntimeError("TLS needs both --tls-cert and --tls-key")
    _check_pem(config)
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        # With a client CA, a client without a certificate signed by it is refused in the
        # TLS handshake, before any RPC runs.
        require_client_auth=client_ca is not None,
    )


def _check_pem(config: SecurityConfig) -> None:
    # gRPC takes any bytes here and then fails to bind ("Failed to bind to address ...; set
    # GRPC_VERBOSITY=debug"), which reads as a port taken; the ssl module says what is wrong.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)  # type: ignore[arg-type]
    except ssl.SSLError as exc:
        raise RuntimeError(
            f"--tls-cert and --tls-key are not a PEM certificate chain and its private key "
            f"({config.tls_cert}, {config.tls_key}: {exc.reason or exc})"
        ) from None
    if config.tls_client_ca is None:
        return
    try:
        context.load_verify_locations(cafile=config.tls_client_ca)
    except ssl.SSLError as exc:
        raise RuntimeError(
            f"--tls-client-ca {config.tls_client_ca} holds no PEM certificate ({exc.reason or exc})"
        ) from None


def add_port(server: grpc.aio.Server, address: str, config: SecurityConfig) -> int:
    """Binds `address` with TLS when configured; returns the port (0 when binding failed)."""
    credentials = server_credentials(config)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
