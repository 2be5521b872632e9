"""Serving Zep's REST API with uvicorn inside gRPC's event loop.

One process, one asyncio loop: grpc.aio and uvicorn's `Server.serve()` run as tasks of the
same loop, so both share the store's connection pool, the authenticator's key cache and the
embedding model, with no thread hand-off on the request path. uvicorn (with httptools)
is the fastest well-kept pure-asyncio HTTP/1.1 server; it takes pre-bound sockets, which
is how `--workers N` shares the port (SO_REUSEPORT, as gRPC does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from server.config import Config, SecurityConfig
from server.rest.app import RestApp
from server.rest.cors import with_cors
from server.rest.protocol import bounded_protocol
from server.serving.ports import bind
from server.settings import source

log = logging.getLogger(__name__)

#: uvicorn's warnings whose number its clients choose: one per upgrade asked for (two lines,
#: one advising `pip install 'uvicorn[standard]'`: the request is then served as any other,
#: counted and in the access log) and one per request it cannot parse (refused, counted and
#: logged by the app: BoundedHttpProtocol.refused). Any client could flood the log with them.
CLIENT_CHOSEN_WARNINGS = (
    "Unsupported upgrade request.",
    "No supported WebSocket library detected.",
    "Invalid HTTP request received.",
)


def _not_client_chosen(record: logging.LogRecord) -> bool:
    return not (
        record.levelno == logging.WARNING
        and isinstance(record.msg, str)
        and record.msg.startswith(CLIENT_CHOSEN_WARNINGS)
    )


# uvicorn's own lines ("Started server process") repeat what memstore logs; its errors stay.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
logging.getLogger("uvicorn.error").addFilter(_not_client_chosen)

#: Connections queued in the kernel before accept; uvicorn's default.
_BACKLOG = 2048


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: memstore's serve loop owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A running uvicorn server over pre-bound sockets; `stop` ends it gracefully."""

    def __init__(self, server: uvicorn.Server, sockets: list[socket.socket], port: int) -> None:
        self._server = server
        self._sockets = sockets
        self.port = port
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Starts serving; returns once the sockets accept connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=self._sockets))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what made the start fail
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting, lets in-flight requests finish within `grace` seconds."""
        if self._task is None:
            for sock in self._sockets:
                sock.close()
            return
        # The grace period is bounded here, not by uvicorn: at its end uvicorn cancels the
        # requests still running and does not wait for them, so the server went on to close
        # the pool while their queries were being cancelled, and a statement left running
        # in PostgreSQL committed once its lock was free, after its caller was told it
        # failed (tests/reliability/test_sigterm.py). Each cancelled request answers 503
        # (RestApp) once its query is cancelled; they are waited for, as gRPC's calls are.
        self._server.config.timeout_graceful_shutdown = None
        self._server.should_exit = True
        if grace is None:
            self._server.force_exit = True
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        if not done:
            running = set(self._server.server_state.tasks)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=SETTLE_SECONDS)
            # Whatever still holds a connection (a request deaf to its cancel) no longer
            # holds the stop: uvicorn waits for connections without end unless forced.
            self._server.force_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


#: How long a stop waits for the requests it cancelled to end (their queries' cancels).
SETTLE_SECONDS = 5.0


def listen(config: Config, *, reuse_port: bool) -> tuple[list[socket.socket], int]:
    """Listening sockets on every address of --host:--http-port; the port chosen when it is 0.

    Raises:
        OSError: the port is taken, or the host has no address to bind.
    """
    sockets, port = bind(
        config.host,
        config.http_port,
        reuse_port=reuse_port,
        flag=source(config, "http_port"),
        host_flag=source(config, "host"),
    )
    for sock in sockets:
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    return sockets, port


def _tls(security: SecurityConfig) -> dict[str, Any]:
    # The gRPC port's certificate serves HTTPS too; a client CA requires client
    # certificates on both ports alike.
    if security.tls_cert is None or security.tls_key is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(security.tls_cert),
        "ssl_keyfile": str(security.tls_key),
    }
    if security.tls_client_ca is not None:
        options["ssl_ca_certs"] = str(security.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def http_server(config: Config, app: RestApp) -> HttpServer:
    """An HTTP server for `app` bound to config.host:config.http_port, not yet started.

    Raises:
        OSError: the port is taken.
    """
    sockets, port = listen(config, reuse_port=config.workers > 1)
    settings = uvicorn.Config(
        with_cors(app, config.http_cors_origin),
        lifespan="off",
        log_config=None,
        access_log=False,  # server/rest/app.py writes memstore's own access lines
        server_header=False,
        # The refusals the connection answers itself are counted and logged by the app.
        http=bounded_protocol(app.refused_unread, config.security.max_connections),
        timeout_graceful_shutdown=max(int(config.grace_period), 1),
        **_tls(config.security),
    )
    return HttpServer(_Server(settings), sockets, port)
