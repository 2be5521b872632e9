"""Channels to memstore: plaintext or TLS (optionally mutual), sync or asyncio."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

#: memstore accepts requests up to 16 MiB and may answer 1 MiB more (the uuids, times and
#: sequences it adds to a 1000-message memory it stored).
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_MAX_RESPONSE_BYTES = _MAX_MESSAGE_BYTES + 1024 * 1024
_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_RESPONSE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True, slots=True)
class TLS:
    """TLS settings; an empty TLS() trusts the system's root certificates.

    Attributes:
        root_certificates: PEM of the CA that signed the server's certificate.
        certificate_chain: PEM of this client's certificate, for mutual TLS.
        private_key: PEM of this client's key, for mutual TLS.
        server_name: the name to check the server's certificate against, when it differs
            from the host of the address (e.g. connecting by IP).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials of these settings."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the message limits, and the name override when set."""
        if self.server_name is None:
            return list(_OPTIONS)
        return [*_OPTIONS, ("grpc.ssl_target_name_override", self.server_name)]


def check_address(address: str) -> str:
    """`address` ("host:port", or any gRPC target) when the port it ends in, if any, is 0 to
    65535: gRPC reads a larger one modulo 65536 (port 99999 reached 34463).

    Raises:
        ValueError: the port is out of range.
    """
    host, colon, port = address.rpartition(":")
    if not colon or not host or address.startswith(("unix:", "unix-abstract:")):
        return address
    digits = port.removeprefix("-").removeprefix("+")
    if digits.isascii() and digits.isdigit() and (port != digits or int(digits) > 65535):
        raise ValueError(f"port {port} is not 0 to 65535")
    return address


def _tls(tls: TLS | bool) -> TLS | None:
    if tls is True:
        return TLS()
    return tls or None


def _merged(
    defaults: list[tuple[str, Any]], extra: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    # gRPC takes the first of repeated keys in some versions and the last in others: give
    # each key once, the caller's value over the default.
    merged = dict(defaults)
    merged.update(extra)
    return list(merged.items())


def sync_channel(
    address: str, tls: TLS | bool, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to `address` ("host:port"), with `options` over the defaults.

    Raises:
        ValueError: the address's port is out of range (check_address).
    """
    check_address(address)
    settings = _tls(tls)
    if settings is None:
        return grpc.insecure_channel(address, options=_merged(_OPTIONS, options))
    merged = _merged(settings.options(), options)
    return grpc.secure_channel(address, settings.credentials(), options=merged)


def aio_channel(
    address: str, tls: TLS | bool, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel to `address` ("host:port"), with `options` over the defaults.

    Raises:
        ValueError: the address's port is out of range (check_address).
    """
    check_address(address)
    settings = _tls(tls)
    if settings is None:
        return grpc.aio.insecure_channel(address, options=_merged(_OPTIONS, options))
    merged = _merged(settings.options(), options)
    return grpc.aio.secure_channel(address, settings.credentials(), options=merged)
