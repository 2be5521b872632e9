"""What bounds the connections: at most --max-connections on each port (gRPC's by a server
option, HTTP's in rest/protocol.py), idle gRPC ones closed (a server option) and, for the
process, file descriptors raised to the hard limit and the accept loop's out-of-descriptors
errors logged at most once a period. Streams per connection are not limited: with
grpc.max_concurrent_streams at 1,000, 504 of tests/grpc/test_burst.py's 1,500 calls on one
new connection got UNAVAILABLE where the cap answers overload (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

log = logging.getLogger(__name__)

#: Milliseconds a connection with no call open is kept: then the server sends GOAWAY and
#: closes it; gRPC clients reconnect on their next call.
CONNECTION_IDLE_MS = 5 * 60 * 1000
#: Connections one serving process keeps open on each port unless told (--max-connections):
#: the two ports' together stay under a hard open-files limit of 20,000 with room for the pool.
MAX_CONNECTIONS_DEFAULT = 4096
#: The most --max-connections accepts (gRPC's option is a C int; far past any descriptor limit).
MAX_CONNECTIONS = 1_000_000
#: Descriptors a serving process needs besides its clients' connections: the pool's
#: connections, the listening sockets, logs, the embedded PostgreSQL's pipes.
_OWN_DESCRIPTORS = 256
#: Seconds between two log records of the accept loop running out of file descriptors.
ACCEPT_ERROR_PERIOD = 10.0


def grpc_options(max_connections: int) -> list[tuple[str, Any]]:
    """The grpc.aio server's options that bound its connections: a connection past
    `max_connections` is closed as it is accepted, before its handshake
    (tests/reliability/test_connections.py)."""
    return [
        ("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS),
        ("grpc.max_allowed_incoming_connections", max_connections),
    ]


def raise_open_files_limit() -> int:
    """Raises this process's soft limit on open files to its hard limit (each connection
    holds one): a soft limit of 1024 ran out at 1,100 idle connections. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:  # pragma: no cover - a platform refusing
            log.debug("open files limit stays %d: %s", soft, error)
            return soft
        soft = hard
    log.debug("open files limit: %d", soft)
    return soft


class AcceptErrors:
    """An event loop exception handler that logs asyncio's "socket.accept() out of system
    resource" records (one per failed accept, with its traceback: ~2,000 a second while the
    process is out of file descriptors) once per `period` seconds, with how many there were;
    every other record goes to the handler it replaces."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float = ACCEPT_ERROR_PERIOD):
        self._period = period
        self._last = -period
        self._held = 0
        previous = loop.get_exception_handler()
        self._previous = previous

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system"):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self._held += 1
        now = time.monotonic()
        if now - self._last < self._period:
            return
        self._last = now
        log.error(
            "cannot accept connections: %s (%d failed accepts since the last such record; "
            "one record per %.0f s)",
            context.get("exception"),
            self._held,
            self._period,
        )
        self._held = 0


def quiet_accept_errors() -> None:
    """Installs AcceptErrors on the running loop."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrors(loop))


def prepare_descriptors(max_connections: int, ports: int, pool_size: int) -> None:
    """At the start of serving: the open files limit raised, accept errors rate-limited, and
    a warning when the limit is below what `max_connections` on each of `ports` admits (then
    the limit, not the setting, is what runs out first, for the pool's connections too)."""
    limit = raise_open_files_limit()
    needed = max_connections * ports + pool_size + _OWN_DESCRIPTORS
    if limit < needed:
        log.warning(
            "the open files limit (%d) is below what --max-connections %d admits on %d "
            "port(s) with a pool of %d (%d): lower --max-connections or raise the limit "
            "(ulimit -Hn), or new connections and the pool's may fail for want of descriptors",
            limit, max_connections, ports, pool_size, needed,
        )  # fmt: skip
    quiet_accept_errors()
