"""The ambiguous commit: AddMemory commits, the connection dies before the answer arrives, the
caller sees UNAVAILABLE and retries with the same uuids — and each message is stored once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import psycopg
import pytest
from psycopg import conninfo as pg_conninfo

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import session_service_pb2_grpc
from memstore_client import AsyncMemstore, Message, RetryPolicy
from server.config import Config
from server.serving.app import build_server
from server.store import Store
from tests.grpc import msg

#: PostgreSQL's ReadyForQuery, idle: sent only after the statement's transaction committed.
_READY_IDLE = b"Z\x00\x00\x00\x05I"
DEADLINE = 5.0


class CommitCutter:
    """A TCP proxy to PostgreSQL that lets one armed statement commit, then cuts its connection
    before the answer reaches the client: the commit happened, the caller cannot know it."""

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Bytes of the statement to cut; None passes everything through.
        self.armed: bytes | None = None
        self.cuts = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self._socket_path)
        cut = asyncio.Event()
        pumps = [
            asyncio.ensure_future(self._to_server(reader, up_writer, cut)),
            asyncio.ensure_future(self._to_client(up_reader, writer, cut)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
            self._tasks.discard(pump)
        for w in (writer, up_writer):
            w.close()

    async def _to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event
    ) -> None:
        while data := await reader.read(65536):
            if self.armed is not None and self.armed in data:
                self.armed = None
                cut.set()
            writer.write(data)
            await writer.drain()

    async def _to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event
    ) -> None:
        answer = b""
        while data := await reader.read(65536):
            if cut.is_set():
                # Swallow the answer until the server says it is idle again (committed),
                # then return: the client's connection is closed without it.
                answer += data
                if answer.endswith(_READY_IDLE):
                    self.cuts += 1
                    return
                continue
            writer.write(data)
            await writer.drain()


def _socket_path(url: str) -> str:
    params = pg_conninfo.conninfo_to_dict(url)
    return f"{params['host']}/.s.PGSQL.{params.get('port') or 5432}"


@pytest.fixture
async def cutter(fault_url: str) -> AsyncIterator[tuple[CommitCutter, str]]:
    proxy = CommitCutter(_socket_path(fault_url))
    await proxy.start()
    url = pg_conninfo.make_conninfo(fault_url, host="127.0.0.1", port=str(proxy.port))
    yield proxy, url
    await proxy.close()


@pytest.fixture
async def cut_server(
    cutter: tuple[CommitCutter, str],
) -> AsyncIterator[tuple[CommitCutter, grpc.aio.Channel]]:
    proxy, url = cutter
    store = await Store.open(url, min_size=1, max_size=4, timeout=3)
    await store.migrate()
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield proxy, channel
    finally:
        await server.stop(None)
        await store.close()


def _stored(url: str, session_id: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT uuid::text, sequence FROM messages WHERE session_id = %s ORDER BY sequence",
            [session_id],
        ).fetchall()
    return [(str(u), int(s)) for u, s in rows]


async def _until_answered(
    call: Callable[[], Awaitable[spb.AddMemoryResponse]],
) -> spb.AddMemoryResponse:
    # After the cut the server marks the database down and answers UNAVAILABLE at once (no
    # write) until its probe is back: retry those, as a client does.
    for _ in range(100):
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            await asyncio.sleep(0.1)
    raise AssertionError("the retry never got an answer")


async def test_a_retry_after_a_lost_commit_stores_each_message_once(
    cut_server: tuple[CommitCutter, grpc.aio.Channel], fault_url: str
) -> None:
    proxy, channel = cut_server
    sessions = session_service_pb2_grpc.SessionServiceStub(channel)
    uuids = [str(uuid.uuid4()) for _ in range(3)]
    request = spb.AddMemoryRequest(
        session_id="s", messages=[msg(f"m{i}", uuid=u) for i, u in enumerate(uuids)]
    )
    await sessions.AddMemory(spb.AddMemoryRequest(session_id="s", messages=[msg("before")]))
    proxy.armed = uuids[0].encode()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sessions.AddMemory(request, timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert proxy.cuts == 1
    # The commit happened although the caller was told UNAVAILABLE.
    assert [u for u, _ in _stored(fault_url, "s")[1:]] == uuids

    answer = await _until_answered(lambda: sessions.AddMemory(request, timeout=DEADLINE))
    expected = list(zip(uuids, [2, 3, 4], strict=True))
    assert [(m.uuid, m.sequence) for m in answer.messages] == expected
    assert answer.session.message_count == 4
    assert _stored(fault_url, "s")[1:] == expected


async def test_the_client_retries_a_lost_add_without_duplicates(
    cut_server: tuple[CommitCutter, grpc.aio.Channel], fault_url: str
) -> None:
    proxy, channel = cut_server
    # The client's own uuids (none given here) are what the proxy sees in the statement.
    proxy.armed = b"remember the beagle"
    retry = RetryPolicy(max_attempts=30, initial_backoff=0.1, max_backoff=0.2)
    client = AsyncMemstore(channel=channel, retry=retry, timeout=DEADLINE)
    added = await client.memory.add(
        "s", [Message("remember the beagle", role_type="user"), Message("ok", role="agent")]
    )
    assert proxy.cuts == 1
    assert [m.sequence for m in added] == [1, 2]
    stored = _stored(fault_url, "s")
    assert stored == [(m.uuid, m.sequence) for m in added]
