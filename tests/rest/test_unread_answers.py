"""Clients that do not read their answers, or pipeline many requests: the REST port bounds the
first and serves the second (server/rest/protocol.py, BoundedHttpProtocol).

uvicorn kept an unread answer whole in the transport's buffer, and its closes (the keep-alive
timer's, the head timer's) waited for the client to read it: 60 connections that never read a
4 MB answer held 130 MB until the clients left, and a pipelined request's answer waited in
uvicorn's send() holding its call against --max-calls-in-flight (25 such connections took
all 20 calls: every other caller, gRPC's too, was refused as overloaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from server.config import Config
from server.domain import DEFAULT_PROJECT_ID, NewMessage
from server.rest import protocol
from server.serving.app import build_http
from server.serving.limit import CallLimit
from server.serving.metrics import Metrics
from server.store import Store
from tests.polling import until

pytestmark = pytest.mark.usefixtures("clean_db")

#: Messages of 1 MiB in the big session: an answer of 8 MiB, far more than the kernel's
#: buffers of a client that reads nothing (4 KiB) and of the server's side (4 MiB at most).
BIG_MESSAGES = 8
BIG_READ = b"GET /api/v2/sessions/big/memory?lastn=8 HTTP/1.1\r\nHost: a\r\n\r\n"


@contextlib.asynccontextmanager
async def _server(store: Store, limit: CallLimit | None = None) -> AsyncIterator[int]:
    server = await build_http(
        Config(host="127.0.0.1", http_port=0, embedder="none"), store, Metrics(), limit=limit
    )
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop(None)


async def _big_session(store: Store) -> None:
    message = NewMessage("a", "user", "x" * (2**20 - 16), {}, None)
    await store.add_memory(DEFAULT_PROJECT_ID, "big", None, [message] * BIG_MESSAGES)


async def _deaf_client(port: int, request: bytes) -> socket.socket:
    """A connection that sends `request` and reads nothing, with a 4 KiB receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


#: tcpi_state of a TCP socket that is closed (Linux's TCP_CLOSE): here, reset by the server.
_TCP_CLOSE = 7


async def _closed(sock: socket.socket) -> bool:
    """Whether the connection is over, seen without reading from it (TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE


async def _read_all(sock: socket.socket, within: float = 5.0) -> tuple[int, bool]:
    """Bytes read until the server ends the connection (or `within` seconds pass), and
    whether it reset it."""
    loop, got = asyncio.get_running_loop(), 0
    try:
        async with asyncio.timeout(within):
            while data := await loop.sock_recv(sock, 1 << 20):
                got += len(data)
    except ConnectionResetError:
        return got, True
    except TimeoutError:
        pass
    return got, False


class _CountingLimit(CallLimit):
    """A CallLimit that counts the calls it let in."""

    def __init__(self, most: int) -> None:
        super().__init__(most)
        self.entered = 0

    def enter(self) -> None:
        super().enter()
        self.entered += 1


async def test_a_pipelined_answer_never_read_frees_its_call(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "WRITE_STALL_SECONDS", 1.0)
    await _big_session(store)
    limit = _CountingLimit(1)
    async with _server(store, limit) as port:
        # The second answer waits to be written behind the first, in its call, until the
        # client reads: it never does.
        deaf = await _deaf_client(port, BIG_READ * 2)
        try:

            async def second_call_taken_in() -> bool:
                # Held until the stall resets the connection (a second): a poll that missed
                # that window would fail a working server.
                return limit.entered >= 2

            # No other client until then: a call of its own let in between the deaf
            # connection's two took the one slot, the second was refused (429, a few bytes)
            # and both answers were read whole (the official CI of stop 41).
            assert await until(second_call_taken_in, within=8), vars(limit)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

                async def served() -> bool:
                    return (await http.get("/api/v2/users/u")).status_code == 404

                # Refused as overloaded (429) while the deaf connection holds the one call.
                assert await until(served, within=8)
            got, reset = await _read_all(deaf)
            assert reset and got < BIG_MESSAGES * 2**20, got  # both answers dropped
        finally:
            deaf.close()


async def test_an_unread_answer_is_reset_when_the_connection_times_out(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The head timer (as uvicorn's keep-alive timer) closed the connection: the close
    # waited for the client to read the 8 MiB, kept in the server's memory until it did.
    monkeypatch.setattr(protocol, "HEAD_SECONDS", 0.5)
    monkeypatch.setattr(protocol, "WRITE_STALL_SECONDS", 60.0)
    await _big_session(store)
    async with _server(store) as port:
        deaf = await _deaf_client(port, BIG_READ)
        try:
            # The answer written and the connection's time over (this head timer's, or the
            # keep-alive timer's 5 s): the server reset it.
            # (A fixed 2 s was not always enough to build the answer under load: read while it
            # was still written, it was read whole and the connection closed cleanly.)
            assert await until(lambda: _closed(deaf), within=10)
            got, reset = await _read_all(deaf)
            assert reset and got < BIG_MESSAGES * 2**20, got
        finally:
            deaf.close()


async def test_pipelined_requests_past_the_head_limit_in_one_read_are_all_answered(
    store: Store,
) -> None:
    # A read that began and ended inside a head was counted whole as head bytes, with the
    # 70 KB of whole requests between: the connection was closed with 431 and not one of
    # the 2,002 requests answered.
    one = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    many = 2000
    assert len(one) * many > protocol.MAX_HEAD_BYTES
    async with _server(store) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(one[:20])  # a head begun: one read
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(one[20:] + one * many + last[:20])  # another, ending in a head
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(last[20:])
        answers = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert answers.count(b"HTTP/1.1 200 ") == many + 2, answers[-300:]


async def test_a_head_past_the_limit_in_one_read_is_431(store: Store) -> None:
    # Only reads that neither began nor ended a head were counted: a 70 KB head sent at
    # once was answered 200.
    def head(header_bytes: int) -> bytes:
        line = b"X-Filler: " + b"f" * 990 + b"\r\n"  # 1,002 bytes
        return (
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            + line * (header_bytes // len(line))
            + b"\r\n"
        )

    async with _server(store) as port:
        for size, status in ((protocol.MAX_HEAD_BYTES - 2000, b"200"), (70_000, b"431")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head(size))
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 " + status), (size, answer[:200])


async def test_upgrades_and_malformed_requests_do_not_flood_the_log(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn logged two WARNINGs per upgrade asked for (one advising to install
    # uvicorn[standard]) and one per request it could not parse: as many as a client liked.
    async with _server(store) as port:
        with caplog.at_level(logging.DEBUG, logger="uvicorn.error"):
            for request in (
                b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n",
                b"NOT HTTP AT ALL\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)
                writer.close()
                assert answer.split()[1] in (b"200", b"400"), answer
    assert [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"] == []


async def test_a_slow_reader_of_a_big_answer_is_not_reset(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It reads far more than WRITE_MIN_BYTES each WRITE_STALL_SECONDS, yet the answer waits
    # past the high-water mark for longer than that: it is read to its end. (1 s: at 0.5 s a
    # pause of the loop the client and server share, a collection under load, left no slack.
    # 128 reads of at most 64 KiB, 20 ms apart, still take more than two of them.)
    monkeypatch.setattr(protocol, "WRITE_STALL_SECONDS", 1.0)
    await _big_session(store)
    async with _server(store) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock, BIG_READ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        )
        got, started = 0, loop.time()
        try:
            async with asyncio.timeout(20):
                while data := await loop.sock_recv(sock, 64 * 1024):
                    got += len(data)
                    await asyncio.sleep(0.02)
        finally:
            sock.close()
        assert got > BIG_MESSAGES * 2**20
        assert loop.time() - started > 2 * protocol.WRITE_STALL_SECONDS
