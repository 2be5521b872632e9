"""What bounds the connections: at most --max-connections on each port, idle gRPC
connections closed, the process's open files limit, and the accept loop's errors while it is
out of descriptors."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import Config
from server.serving import connections
from server.serving.app import build_server
from server.store import Store
from tests.processes import free_port, serve_memstore, stop_memstore
from tests.raw_h2 import WindowShut


@asynccontextmanager
async def _server(store: Store) -> AsyncIterator[int]:
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def test_an_idle_connection_is_closed(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "CONNECTION_IDLE_MS", 500)
    async with _server(store) as port:
        idle = await WindowShut().open(port)
        try:
            await asyncio.wait_for(idle.closed.wait(), timeout=5)
            assert idle.goaway
        finally:
            await idle.close()


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 1024, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        assert connections.raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_files_limits(pid: int) -> tuple[int, int]:
    """The soft and hard open files limits of process `pid`, as /proc says."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


def test_memstore_serve_runs_with_its_open_files_limit_raised(clean_db: str) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(1024, hard // 2)  # below the hard limit, so that the test can fail
    proc, _ = serve_memstore(
        "--purge-interval", "0", "--no-embedding-worker",
        env={**os.environ, "DATABASE_URL": clean_db},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard)),
    )  # fmt: skip
    try:
        assert _open_files_limits(proc.pid) == (hard, hard)
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out


async def test_accept_errors_are_logged_once_a_period_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    others: list[str] = []
    loop.set_exception_handler(lambda _loop, context: others.append(context["message"]))
    try:
        handler = connections.AcceptErrors(loop, period=60)
        error = OSError(24, "Too many open files")
        with caplog.at_level(logging.ERROR, logger=connections.__name__):
            for _ in range(1000):
                context = {"message": "socket.accept() out of system resource", "exception": error}
                handler(loop, context)
            handler(loop, {"message": "something else"})
        records = [r for r in caplog.records if r.name == connections.__name__]
        assert len(records) == 1
        assert "1 failed accepts" in records[0].getMessage()
        handler._last -= 60  # a period later: the next record counts those held meanwhile
        handler(loop, context)
        assert "1000 failed accepts" in caplog.records[-1].getMessage()
        assert others == ["something else"]
    finally:
        loop.set_exception_handler(None)


def _http_get(sock: socket.socket) -> bytes:
    """Sends GET /healthz on a kept-alive connection; returns what came back within 10 s."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: memstore\r\n\r\n")
    return _read_answer(sock)


def _read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _checked(port: int) -> grpc.Channel:
    # Its own connection (no shared subchannel), made and proven by a health check.
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.RpcError:
        channel.close()
        raise
    return channel


def _taken_in(port: int, within: float = 10) -> grpc.Channel:
    """A connection of its own (_checked), retried until the server takes one in: one just
    closed is counted out when the server sees it go, not when the client closes it."""
    deadline = time.monotonic() + within
    while True:
        try:
            return _checked(port)
        except grpc.RpcError:
            assert time.monotonic() < deadline, "no connection taken in after one closed"
            time.sleep(0.2)


def test_connections_past_max_connections_are_refused_on_both_ports(clean_db: str) -> None:
    http_port = free_port()
    proc, port = serve_memstore(
        "--max-connections", "2", "--http-port", str(http_port), "--purge-interval", "0",
        env={**os.environ, "DATABASE_URL": clean_db},
    )  # fmt: skip
    held: list[grpc.Channel] = []
    sockets: list[socket.socket] = []
    try:
        # serve_memstore's own health channel is closed, but may not yet be counted out.
        held = [_taken_in(port), _taken_in(port)]
        # A third connection is closed as it is accepted: its call fails at once.
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as third:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(third).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        # The two held connections still serve; once one is gone, a new one is taken in.
        health_pb2_grpc.HealthStub(held[1]).Check(health_pb2.HealthCheckRequest(), timeout=10)
        held.pop(0).close()
        held.append(_taken_in(port))

        # The HTTP port: two kept-alive connections answered, a third told why and closed.
        sockets = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(2)]
        for sock in sockets:
            assert _http_get(sock).startswith(b"HTTP/1.1 200"), "a held connection not served"
        with socket.create_connection(("127.0.0.1", http_port)) as third_http:
            answer = _read_answer(third_http)
            assert answer.startswith(b"HTTP/1.1 429"), answer
            assert b"SERVER_OVERLOADED" in answer and b"--max-connections" in answer, answer
            assert third_http.recv(1) == b"", "the refused connection was left open"
        assert _http_get(sockets[1]).startswith(b"HTTP/1.1 200")
        sockets.pop(0).close()
        deadline = time.monotonic() + 10
        while True:
            with socket.create_connection(("127.0.0.1", http_port)) as again:
                if _http_get(again).startswith(b"HTTP/1.1 200"):
                    break
            assert time.monotonic() < deadline, "no HTTP connection taken in after one closed"
            time.sleep(0.2)
    finally:
        for sock in sockets:
            sock.close()
        for channel in held:
            channel.close()
        code, out = stop_memstore(proc)
    assert code == 0, out


def test_an_open_files_limit_below_what_the_caps_admit_is_warned_of(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(connections, "quiet_accept_errors", lambda: None)
    monkeypatch.setattr(connections, "raise_open_files_limit", lambda: 5000)
    with caplog.at_level(logging.WARNING, logger=connections.__name__):
        connections.prepare_descriptors(2000, 2, 20)  # 4,000 + 20 + 256: fits
        assert not caplog.records
        connections.prepare_descriptors(4096, 2, 20)  # 8,192 + 276: does not
    (record,) = caplog.records
    assert "open files limit (5000)" in record.getMessage()
    assert "--max-connections 4096" in record.getMessage()
