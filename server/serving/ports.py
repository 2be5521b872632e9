"""Binding memstore's listening ports: every address of host:port, with one clear error."""

from __future__ import annotations

import errno
import socket


def bind(
    host: str, port: int, *, reuse_port: bool, flag: str, host_flag: str = "--host"
) -> tuple[list[socket.socket], int]:
    """Sockets bound (not yet listening) to every address of host:port, and the port: the
    one chosen here when `port` is 0.

    `flag` and `host_flag` name what chose this port and host (a flag, or the environment
    variable that set it: settings.source), for the error's advice.

    Raises:
        OSError: the port is taken, or the host has no address to bind; one line that says so.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        # It was "[Errno -2] Name or service not known", naming neither the host nor its flag.
        raise OSError(
            f"cannot listen on {host}:{port}: {host_flag} {host!r} has no address "
            f"({exc.strerror or exc})"
        ) from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # As gRPC binds: a port whose last server left connections in TIME_WAIT is
            # free; one with a listener is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address[0], port, *address[2:]))
            port = port or int(sock.getsockname()[1])
    except OSError as exc:
        for sock in sockets:
            sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why = (
                f"port {port} is in use (another process listens there: stop it, or choose "
                f"another {flag})"
            )
        raise OSError(f"cannot listen on {host}:{port}: {why}") from exc
    return sockets, port


def probe_port(host: str, port: int, *, flag: str = "--port", host_flag: str = "--host") -> int:
    """Binds (without SO_REUSEPORT) every address of host:port and releases it.

    `memstore serve` probes first, so that a taken port fails before the embedded
    PostgreSQL starts and the migrations run.

    With SO_REUSEPORT the workers would silently share a port with another server that set
    it too; binding without it first fails when anyone holds the port. Returns the port,
    a free one chosen here when `port` is 0 (the workers must all bind the same one).

    Raises:
        OSError: the port is taken, or the host has no address to bind.
    """
    sockets, port = bind(host, port, reuse_port=False, flag=flag, host_flag=host_flag)
    for sock in sockets:
        sock.close()
    return port
