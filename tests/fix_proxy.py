"""A TCP proxy in front of a server (gRPC, PostgreSQL) that freezes, drops and refuses."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest


class _Link:
    """One proxied connection: the client's socket and the server's."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        #: Set: nothing more is forwarded either way, and nothing is read (a frozen peer:
        #: the connection stays open, its buffers fill, no byte and no reset arrives).
        self.frozen = False


class FaultProxy:
    """Forwards 127.0.0.1:`port` to the server's port (or Unix socket) on threads of its own.

    freeze() stops the connections open now and passes new ones (a frozen peer, while the
    address reaches a live one); down() resets every connection and refuses new ones (a
    server stopped), up() listens again on the same port (the server restarted).
    """

    def __init__(self, target: int | str) -> None:
        #: The server's port on 127.0.0.1, or the path of its Unix socket (a PostgreSQL's).
        self._target = target
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self.accepted = 0
        self.port = 0
        #: Seconds waited after each KiB forwarded to the client (0: at full speed). On
        #: loopback a whole short stream is in the client's buffers before it reads its first
        #: chunk, and a freeze then stops nothing: slowed, the rest is still here.
        self.pause = 0.0
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        """Listens (again, on the same port after down())."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuses new connections and resets the open ones."""
        if self._listener is not None:
            # shutdown() wakes the accept() blocked on it; close() alone would not, and the
            # listener went on accepting.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            for sock in link.sockets:
                _reset(sock)

    def freeze(self) -> None:
        """Stops every open connection where it is; new connections are forwarded."""
        with self._lock:
            for link in self._links:
                link.frozen = True

    def thaw(self) -> None:
        """Lets the frozen connections go on where they stopped."""
        with self._lock:
            for link in self._links:
                link.frozen = False

    def close(self) -> None:
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                server = _connect(self._target)
            except OSError:
                _reset(client)
                continue
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
            for src, dst, down in ((client, server, False), (server, client, True)):
                pump = threading.Thread(target=self._pump, args=(link, src, dst, down), daemon=True)
                pump.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, down: bool) -> None:
        with contextlib.suppress(OSError):
            while True:
                while link.frozen and src.fileno() != -1:
                    time.sleep(0.05)
                pause = self.pause if down else 0.0
                data = src.recv(1024 if pause else 65536)
                if not data:
                    break
                while link.frozen and src.fileno() != -1:
                    time.sleep(0.05)
                dst.sendall(data)
                time.sleep(pause)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _connect(target: int | str) -> socket.socket:
    if isinstance(target, int):
        return socket.create_connection(("127.0.0.1", target))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close() sends RST, as a dead peer's kernel does.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
        sock.close()


@pytest.fixture
def proxy(grpc_port: int) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's server."""
    faults = FaultProxy(grpc_port)
    yield faults
    faults.close()
