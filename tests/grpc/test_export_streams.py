"""ExportSessions and ExportMessages over a real channel: order, resume, byte cap, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from google.protobuf import struct_pb2

from memstore.v1 import session_service_pb2 as ss
from tests.fix_db import at_rest, busy_backends
from tests.grpc import Code, Sessions, msg, rpc_error, tamper
from tests.polling import until

#: A chunk stops growing past this many bytes (ExportMessagesRequest.chunk_size).
CHUNK_BYTES = 256 * 1024


async def _sessions(sessions: Sessions, **kw: Any) -> list[ss.ExportSessionsResponse]:
    return [c async for c in sessions.ExportSessions(ss.ExportSessionsRequest(**kw))]


async def _messages(sessions: Sessions, **kw: Any) -> list[ss.ExportMessagesResponse]:
    return [c async for c in sessions.ExportMessages(ss.ExportMessagesRequest(**kw))]


def _message_keys(chunks: list[ss.ExportMessagesResponse]) -> list[tuple[str, int]]:
    return [(m.session_id, m.message.sequence) for c in chunks for m in c.messages]


async def test_export_sessions_streams_live_sessions_once_and_resumes(sessions):
    ids = [f"s{i:03d}" for i in range(120)]
    await asyncio.gather(
        *(sessions.CreateSession(ss.CreateSessionRequest(session_id=s)) for s in ids)
    )
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s007"))
    chunks = await _sessions(sessions, chunk_size=50)
    assert [len(c.sessions) for c in chunks] == [50, 50, 19]
    assert [bool(c.next_page_token) for c in chunks] == [True, True, False]
    streamed = [s.session_id for c in chunks for s in c.sessions]
    assert sorted(streamed) == [s for s in ids if s != "s007"]
    keys = [(s.created_at.ToMicroseconds(), s.session_id) for c in chunks for s in c.sessions]
    assert keys == sorted(keys)
    rest = await _sessions(sessions, chunk_size=50, page_token=chunks[0].next_page_token)
    assert [s.session_id for c in rest for s in c.sessions] == streamed[50:]
    # Sessions created after the token was minted come at the end, none skipped or repeated.
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="late"))
    rest = await _sessions(sessions, page_token=chunks[1].next_page_token)
    assert [s.session_id for c in rest for s in c.sessions] == [*streamed[100:], "late"]


async def test_export_sessions_past_a_batchs_byte_budget_are_each_sent_once(sessions):
    # Batches end by bytes (export_sessions' budget, 1 MiB of metadata and ids): small
    # sessions, then 40 of ~60 KB of metadata over several batches ended early, then small
    # again. Every session comes once, in order, and the chunks are cut as before (at most
    # 256 KiB: four large sessions a chunk).
    large = struct_pb2.Struct()
    large.update({"blob": "x" * 60_000})
    ids = [f"a{i:02d}" for i in range(10)] + [f"b{i:02d}" for i in range(40)]
    ids += [f"c{i:02d}" for i in range(10)]
    for sid in ids:  # one after another: created_at in this order
        metadata = large if sid.startswith("b") else None
        await sessions.CreateSession(ss.CreateSessionRequest(session_id=sid, metadata=metadata))
    chunks = await _sessions(sessions, chunk_size=1000)
    assert [s.session_id for c in chunks for s in c.sessions] == ids
    assert all(c.ByteSize() <= CHUNK_BYTES for c in chunks)
    assert [len(c.sessions) for c in chunks] == [14, *([4] * 8), 14]
    assert [bool(c.next_page_token) for c in chunks] == [True] * 9 + [False]
    resumed = await _sessions(sessions, chunk_size=1000, page_token=chunks[3].next_page_token)
    assert [s.session_id for c in resumed for s in c.sessions] == ids[26:]


async def test_export_messages_orders_by_session_then_sequence(sessions):
    for sid in ("b", "a", "c"):
        batch = [msg(f"{sid}-{i}") for i in range(30)]
        await sessions.AddMemory(ss.AddMemoryRequest(session_id=sid, messages=batch))
    await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="c"))
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="c", messages=[msg("c-new")]))
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="d", messages=[msg("gone")]))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="d"))
    chunks = await _messages(sessions, chunk_size=25)
    keys = _message_keys(chunks)
    assert keys == [("a", i) for i in range(1, 31)] + [("b", i) for i in range(1, 31)] + [("c", 31)]
    contents = [m.message.content for c in chunks for m in c.messages]
    assert contents[0] == "a-0" and contents[-1] == "c-new"
    assert [len(c.messages) for c in chunks] == [25, 25, 11]
    for i, chunk in enumerate(chunks[:-1]):
        rest = await _messages(sessions, chunk_size=25, page_token=chunk.next_page_token)
        assert _message_keys(rest) == keys[(i + 1) * 25 :]


async def test_export_messages_chunks_are_capped_by_bytes(sessions):
    big = [msg("x" * (100 * 1024)) for _ in range(7)] + [msg("y" * (300 * 1024))]
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="big", messages=big))
    chunks = await _messages(sessions, chunk_size=1000)
    assert len(_message_keys(chunks)) == 8
    # Two 100 KiB messages fit a chunk, three do not; a 300 KiB one travels alone.
    assert [len(c.messages) for c in chunks] == [2, 2, 2, 1, 1]
    assert all(c.ByteSize() <= CHUNK_BYTES for c in chunks[:-1])


async def test_export_messages_after_a_huge_message_are_each_sent_once(sessions):
    # A message past the cap travels alone, also when it ends a batch (the first batch is
    # chunk_size messages) and the next chunk starts in the next batch
    # (server/api/chunking.py, wire_row_chunks).
    batch = [msg("a"), msg("y" * (300 * 1024)), *(msg(f"s{i}") for i in range(5))]
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="big", messages=batch))
    chunks = await _messages(sessions, chunk_size=2)
    assert [len(c.messages) for c in chunks] == [1, 1, 2, 2, 1]
    assert _message_keys(chunks) == [("big", i) for i in range(1, 8)]
    assert [bool(c.next_page_token) for c in chunks] == [True, True, True, True, False]


async def test_export_messages_past_a_batchs_byte_budget_are_each_sent_once(sessions):
    # Batches end by bytes (export_message_columns' budget, 1 MiB): small messages, then
    # large ones over several batches ended early, then small again. Every message comes
    # once, in order, and the chunks are cut as before (two of 400 KiB never share one).
    small = [msg(f"a{i}") for i in range(20)]
    large = [msg("L" * (400 * 1024)) for _ in range(9)]
    tail = [msg(f"z{i}") for i in range(20)]
    for part in (small, large, tail):
        await sessions.AddMemory(ss.AddMemoryRequest(session_id="mixed", messages=part))
    chunks = await _messages(sessions, chunk_size=1000)
    assert _message_keys(chunks) == [("mixed", i) for i in range(1, 50)]
    assert [len(c.messages) for c in chunks] == [20, *([1] * 9), 20]
    assert [bool(c.next_page_token) for c in chunks] == [True] * 10 + [False]
    resumed = await _messages(sessions, chunk_size=1000, page_token=chunks[4].next_page_token)
    assert _message_keys(resumed) == _message_keys(chunks)[24:]


async def test_export_messages_of_a_time_a_datetime_cannot_hold_fails_as_objects_do(
    sessions, clean_db
):
    # Such a batch is read the object path's way (message_wire.OutOfRange), which cannot
    # load the timestamp: the stream fails as every read of that message does.
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="a", messages=[msg(str(i)) for i in range(3)])
    )
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="b", messages=[msg("late")]))
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("UPDATE messages SET updated_at = 'infinity' WHERE session_id = 'b'")
    # INTERNAL: a stored value the server cannot read is not the caller's fault (until
    # 2026-12-01 it was INVALID_ARGUMENT naming "request", the object path's DataError).
    error = await rpc_error(
        _messages(sessions, chunk_size=3), Code.INTERNAL, reason="STORED_VALUE_UNREADABLE"
    )
    assert "stored in the database could not be read" in error.details()


async def test_a_batch_read_as_objects_that_changed_meanwhile_fails_to_be_resumed(
    sessions, clean_db, store, monkeypatch
):
    # The next batch is asked for after the last message of this one as first read, before
    # this one is encoded; a batch read again as objects (a timestamp the wire encoding
    # cannot hold) that no longer ends there would lose or repeat messages: the stream fails,
    # resumable, rather than send them. Here, between the two reads, the timestamp is mended
    # and a message lands inside the batch (a, 4), so the objects end at (a, 4), not (b, 1).
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="a", messages=[msg(str(i)) for i in range(3)])
    )
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="b", messages=[msg("late")]))
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("UPDATE messages SET updated_at = 'infinity' WHERE session_id = 'b'")
    export_messages = store.export_messages
    asked = []

    async def meanwhile(project, after, limit, **options):
        asked.append(limit)
        async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
            await conn.execute("UPDATE messages SET updated_at = now() WHERE session_id = 'b'")
        await sessions.AddMemory(ss.AddMemoryRequest(session_id="a", messages=[msg("new")]))
        return await export_messages(project, after, limit, **options)

    monkeypatch.setattr(store, "export_messages", meanwhile)
    # One batch of all four messages; read again as objects, it holds a1 to a4.
    error = await rpc_error(
        _messages(sessions, chunk_size=10), Code.UNAVAILABLE, reason="CONCURRENT_WRITES"
    )
    assert asked == [4]
    assert "changed while" in error.details()
    monkeypatch.undo()
    # Read again, every message once, the one written meanwhile too.
    chunks = await _messages(sessions, chunk_size=10)
    assert _message_keys(chunks) == [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1)]


async def test_a_batch_read_as_objects_keeps_the_byte_budget(
    sessions, clean_db, store, monkeypatch
):
    # A batch holding a timestamp the wire encoding cannot hold is read as objects; that read
    # took the batch's `limit` of messages (1,000: here all 49, 3.6 MB) however large, where
    # the wire path ends at 1 MiB. Now it reads the messages the budget kept: 20 small and
    # three of 400 KiB (those before each hold less than 1 MiB).
    small = [msg(f"a{i}") for i in range(20)]
    large = [msg("L" * (400 * 1024)) for _ in range(9)]
    for part in (small, large, small):
        await sessions.AddMemory(ss.AddMemoryRequest(session_id="mixed", messages=part))
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("UPDATE messages SET updated_at = 'infinity' WHERE sequence = 21")
    asked = []
    export_messages = store.export_messages

    async def spy(project, after, limit, **options):
        asked.append(limit)
        return await export_messages(project, after, limit, **options)

    monkeypatch.setattr(store, "export_messages", spy)
    await rpc_error(
        _messages(sessions, chunk_size=1000), Code.INTERNAL, reason="STORED_VALUE_UNREADABLE"
    )
    assert asked == [23]


async def test_export_rejects_bad_requests(sessions):
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("a"), msg("b")]))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="t"))
    first = (await _messages(sessions, chunk_size=1))[0]
    sessions_token = (await _sessions(sessions, chunk_size=1))[0].next_page_token
    for call in (
        _messages(sessions, chunk_size=-1),
        _sessions(sessions, chunk_size=-5),
    ):
        await rpc_error(call, Code.INVALID_ARGUMENT, field="chunk_size")
    for call in (
        _messages(sessions, page_token=tamper(first.next_page_token)),
        _messages(sessions, page_token=sessions_token),
        _sessions(sessions, page_token=first.next_page_token),
        _sessions(sessions, page_token="not-a-token"),
    ):
        await rpc_error(
            call, Code.INVALID_ARGUMENT, field="page_token", reason="INVALID_PAGE_TOKEN"
        )


async def test_paused_export_holds_no_connection_and_cancel_ends_it(sessions, clean_db, store):
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg(f"m{i}") for i in range(300)])
    )
    call = sessions.ExportMessages(ss.ExportMessagesRequest(chunk_size=50))
    first = await call.read()
    assert isinstance(first, ss.ExportMessagesResponse) and len(first.messages) == 50
    # The client stops reading: between chunks no transaction is open, no connection is out.
    await until(lambda: at_rest(clean_db, store))
    assert await busy_backends(clean_db) == []
    stats = store.pool_stats()
    assert stats.get("pool_size", 0) == stats.get("pool_available", 0), stats
    call.cancel()
    await until(lambda: at_rest(clean_db, store))
    stats = store.pool_stats()
    assert stats.get("pool_size", 0) == stats.get("pool_available", 0), stats
    # The token of the chunk read resumes the export: nothing lost to the cancel.
    rest = await _messages(sessions, chunk_size=1000, page_token=first.next_page_token)
    assert [m.message.sequence for c in rest for m in c.messages] == list(range(51, 301))
