"""TLS credentials from the security settings, and the listening port they shape."""

from __future__ import annotations

import ipaddress
import ssl

import grpc

from server.config import SecurityConfig
from server.settings import source


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
            them; a file cannot be read, or the files are not a PEM certificate chain and
            its key, or a PEM CA bundle (each naming what set it: flag or variable).
    """
    cert, key = source(config, "tls_cert"), source(config, "tls_key")
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise RuntimeError(f"{source(config, 'tls_client_ca')} needs {cert} and {key}")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise RuntimeError(f"TLS needs both {cert} and {key}")
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
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(config, name)
        try:
            if path is not None:
                path.read_bytes()
        except OSError as exc:
            # It was "[Errno 2] No such file or directory", naming neither file nor flag.
            raise RuntimeError(
                f"{source(config, name)} {path} cannot be read ({exc.strerror or exc})"
            ) from None
    # gRPC takes any bytes here and then fails to bind ("Failed to bind to address ...; set
    # GRPC_VERBOSITY=debug"), which reads as a port taken; the ssl module says what is wrong.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)  # type: ignore[arg-type]
    except ssl.SSLError as exc:
        raise RuntimeError(
            f"{source(config, 'tls_cert')} and {source(config, 'tls_key')} are not a PEM "
            f"certificate chain and its private key ({config.tls_cert}, {config.tls_key}: "
            f"{exc.reason or exc})"
        ) from None
    if config.tls_client_ca is None:
        return
    try:
        context.load_verify_locations(cafile=config.tls_client_ca)
    except ssl.SSLError as exc:
        raise RuntimeError(
            f"{source(config, 'tls_client_ca')} {config.tls_client_ca} holds no PEM certificate "
            f"({exc.reason or exc})"
        ) from None


def add_port(server: grpc.aio.Server, address: str, config: SecurityConfig) -> int:
    """Binds `address` with TLS when configured; returns the port (0 when binding failed)."""
    credentials = server_credentials(config)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
