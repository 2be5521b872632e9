"""Clients that send a request head without end, or too slowly: the REST port bounds both.

uvicorn bounds neither: an idle connection, a head trickled a byte at a time and a body that
stops half-way were each held for as long as the client liked, and header lines were kept
without limit (200 MB of them took the server's RSS from 95 to 330 MB, one connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest

from server.config import Config
from server.rest import protocol
from server.serving.app import build_http
from server.serving.limit import CallLimit
from server.serving.metrics import Metrics
from server.store import Store
from tests.polling import until

pytestmark = pytest.mark.usefixtures("clean_db")


@contextlib.asynccontextmanager
async def _server(
    store: Store, limit: CallLimit | None = None, metrics: Metrics | None = None
) -> AsyncIterator[int]:
    server = await build_http(
        Config(host="127.0.0.1", http_port=0, embedder="none"),
        store,
        metrics or Metrics(),
        limit=limit,
    )
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop(None)


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (reading what it answered first)."""
    try:
        await asyncio.wait_for(reader.read(), timeout=0.05)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return reader.at_eof()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """Status and JSON body of the one answer the server sent before closing."""
    status, _, body = await _answer_with_id(reader)
    return status, body


async def _answer_with_id(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, object]]:
    """Status, request id and JSON body of the one answer the server sent before closing."""
    raw = await asyncio.wait_for(reader.read(), timeout=30)
    head, _, body = raw.partition(b"\r\n\r\n")
    rid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    return int(head.split(b" ", 2)[1]), rid, json.loads(body)


async def _head_without_end(port: int) -> tuple[int, str, dict[str, object]]:
    """Header lines a few at a time, never ending the head, until the server answers."""
    line = b"X-Filler: " + b"f" * 990 + b"\r\n"
    reader, writer = await _connect(port)
    answer = asyncio.create_task(_answer_with_id(reader))
    writer.write(b"GET /api/v2/users/u HTTP/1.1\r\nHost: a\r\n")
    sent = 0
    with contextlib.suppress(ConnectionError):  # closed once it answered
        while not answer.done() and sent < 4 * protocol.MAX_HEAD_BYTES // len(line):
            writer.write(line * 4)
            await writer.drain()
            await asyncio.sleep(0.001)
            sent += 4
    writer.close()
    return await answer


async def test_refusals_before_the_app_are_counted_and_logged(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The connection answers these itself (server/rest/protocol.py), before the app sees a
    # request: they were in no metric and had no access line, so a flood of 431s or of
    # malformed bytes showed nowhere but in the clients' own records.
    metrics = Metrics()
    answers: list[tuple[str, int, str]] = []
    async with _server(store, metrics=metrics) as port:
        with caplog.at_level(logging.INFO, logger="memstore.access"):
            status, rid, _ = await _head_without_end(port)
            answers.append(("GET", status, rid))
            for method, request in (
                ("GET", b"GET /" + b"a" * (protocol.MAX_URL_BYTES + 1) + b" HTTP/1.1\r\n\r\n"),
                ("unknown", b"NOT HTTP AT ALL\r\n\r\n"),
                ("POST", b"POST /api/v2/users HTTP/1.1\r\nHost: a\r\n"),  # 408: no end
            ):
                if method == "POST":
                    # Its head's time short (each connection reads it as it is made), and only
                    # its: the 431's 64 KiB in 4 KiB writes outlasted 0.5 s under load.
                    monkeypatch.setattr(protocol, "HEAD_SECONDS", 0.5)
                reader, writer = await _connect(port)
                writer.write(request)
                status, rid, _ = await _answer_with_id(reader)
                writer.close()
                answers.append((method, status, rid))
    assert [status for _, status, _ in answers] == [431, 414, 400, 408]

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    for method, status, _ in answers:
        labels = {"route": "unread", "method": method}
        assert sample("memstore_http_requests_total", **labels, status=str(status)) == 1
        timed = sum(m == method for m, _, _ in answers)
        assert sample("memstore_http_request_duration_seconds_count", **labels) == timed
    # The 408 waited for its head: its latency is the head's time, not 0.
    assert sample("memstore_http_request_duration_seconds_sum", route="unread", method="POST")
    assert sample("memstore_http_in_flight") == 0
    lines = {getattr(r, "request_id", ""): r for r in caplog.records if r.name == "memstore.access"}
    for method, status, rid in answers:
        line = lines[rid]  # the id the answer carried
        assert (line.method, line.code) == (f"{method} unread", status)  # type: ignore[attr-defined]
        assert line.peer.startswith("127.0.0.1:") and line.reason  # type: ignore[attr-defined]


async def test_a_request_head_past_the_limit_is_431_and_no_more_is_read(store: Store) -> None:
    async with _server(store) as port:
        status, _, body = await _head_without_end(port)  # as a slow sender's, a few at a time
        assert status == 431 and body["reason"] == "REQUEST_HEAD_TOO_LARGE"
        assert str(protocol.MAX_HEAD_BYTES) in str(body["message"])

        # One header value without end is refused too (httptools keeps a value whole before
        # handing it over), and the server stops reading: the sender is cut off long before
        # it has sent 64 MiB, which the server took in whole before.
        _, writer = await _connect(port)
        writer.write(b"GET /api/v2/users/u HTTP/1.1\r\nHost: a\r\nX-Long: ")
        sent = 0
        with pytest.raises(ConnectionError):
            while sent < 64 << 20:
                writer.write(b"v" * (1 << 20))
                await writer.drain()
                sent += 1 << 20
        assert sent < 16 << 20
        writer.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/api/v2/users/u")).status_code == 404  # still serving


async def test_a_head_not_complete_in_time_closes_the_connection(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "HEAD_SECONDS", 0.5)
    async with _server(store) as port:
        idle_reader, idle = await _connect(port)  # sends nothing at all
        half_reader, half = await _connect(port)
        half.write(b"GET /api/v2/users/u HTTP/1.1\r\nHost: a\r\n")
        # A kept-alive connection whose next head trickles in after an answer.
        kept_reader, kept = await _connect(port)
        kept.write(b"GET /api/v2/users/u HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await kept_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 404")
        kept.write(b"GET /api/v2/users/u HTTP/1.1\r\n")

        async def trickle() -> None:
            # One header byte each 0.1 s: each byte lets uvicorn's 5 s keep-alive timer go.
            while not kept.is_closing():
                kept.write(b"X")
                await asyncio.sleep(0.1)

        trickling = asyncio.create_task(trickle())
        try:
            assert await until(lambda: _closed(idle_reader), within=30)
            status, body = await _answer(half_reader)  # then closed
            assert status == 408 and body["reason"] == "REQUEST_HEAD_TIMEOUT"
            assert await until(lambda: _closed(kept_reader), within=30)
        finally:
            for writer in (idle, half, kept):
                writer.close()
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await trickling


async def test_a_body_that_stalls_is_408_and_frees_its_call(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "BODY_SECONDS", 0.5)
    async with _server(store, CallLimit(1)) as port:
        reader, writer = await _connect(port)
        writer.write(
            b"POST /api/v2/users HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"user_id": '
        )
        status, body = await _answer(reader)
        assert status == 408 and body["reason"] == "REQUEST_BODY_TIMEOUT"
        writer.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            # The stalled request's call is over: the cap of one admits the next.
            assert (await http.get("/api/v2/users/u")).status_code == 404


async def test_a_client_gone_before_its_body_is_no_server_error(
    store: Store, clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that closes half-way through its body (an aborted upload, a client timeout)
    # was logged as an ERROR with a traceback and counted as a 500: each looked like a fault
    # of the server to its alerts. Nothing was written either way.
    metrics = Metrics()
    server = await build_http(
        Config(host="127.0.0.1", http_port=0, embedder="none"), store, metrics
    )
    await server.start()
    try:
        with caplog.at_level(logging.INFO):
            for path in (b"/api/v2/users", b"/api/v2/sessions/s/memory"):
                _, writer = await _connect(server.port)
                writer.write(
                    b"POST " + path + b" HTTP/1.1\r\nHost: a\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                    b'{"user_id":'
                )
                await writer.drain()
                writer.close()

            def closed(route: str) -> float | None:
                labels = {"route": route, "method": "POST", "status": "499"}
                return metrics.registry.get_sample_value("memstore_http_requests_total", labels)

            async def both() -> bool:
                return (
                    closed("/api/v2/users") == closed("/api/v2/sessions/{session_id}/memory") == 1
                )

            assert await until(both), (closed("/api/v2/users"), caplog.text[-2000:])
    finally:
        await server.stop(None)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    access = [r for r in caplog.records if getattr(r, "code", None) == 499]
    assert [getattr(r, "reason", None) for r in access] == ["CLIENT_CLOSED"] * 2
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        rows = await (await conn.execute("SELECT count(*) FROM sessions")).fetchone()
    assert rows == (0,)


async def test_a_slow_body_that_keeps_the_minimum_rate_is_read(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 s for the body, plus 1 s per 100 bytes received: 12 pieces of 100 bytes, 0.5 s
    # apart, take 5.5 s in all, more than the 2 s, and each arrives at least 1.5 s before
    # its deadline (piece k at 0.5 k s, its deadline at 2 + (k - 1) s): room for a busy
    # machine's late wake-ups.
    monkeypatch.setattr(protocol, "BODY_SECONDS", 2.0)
    monkeypatch.setattr(protocol, "BODY_MIN_RATE", 100)
    body = json.dumps({"user_id": "slow", "metadata": {"note": "e" * 1160}}).encode()
    assert len(body) > 1100
    async with _server(store) as port:
        reader, writer = await _connect(port)
        writer.write(
            b"POST /api/v2/users HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        for start in range(0, len(body), 100):
            writer.write(body[start : start + 100])
            await writer.drain()
            await asyncio.sleep(0.5)
        status, answer = await _answer(reader)
        assert status == 201, answer
        writer.close()


async def test_trailers_past_the_head_limit_close_the_connection(store: Store) -> None:
    # A chunked body's trailer fields were kept as headers without limit after the head:
    # 200 MiB of them took the server's RSS from 123 to 327 MB, even after a 401.
    async with _server(store) as port:
        for trailer in (b"X-T: " + b"t" * 990 + b"\r\n", b"X-Long: "):  # many, or one long
            _reader, writer = await _connect(port)
            writer.write(
                b"POST /api/v2/users HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n0\r\n' + trailer
            )
            filler = trailer * 1000 if trailer.endswith(b"\n") else b"v" * (1 << 20)
            sent = 0
            with pytest.raises(ConnectionError):
                while sent < 64 << 20:
                    writer.write(filler)
                    await writer.drain()
                    sent += len(filler)
            assert sent < 16 << 20
            writer.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/api/v2/users/u")).status_code == 404  # still serving
