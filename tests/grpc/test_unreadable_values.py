"""A stored value the server cannot read is the server's fault: INTERNAL, not the caller's."""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import psycopg
import pytest

from memstore.v1 import session_service_pb2 as ss
from server.store import Store
from tests.grpc import Code, Sessions, msg, rpc_error

#: What the caller is told; the server log says which statement and what the driver said.
MESSAGE = "a value stored in the database could not be read; see the server log"

#: Times PostgreSQL stores and no Python datetime holds: before migration 0017 a session
#: touched at the end of 9999 reached the first; the second only by hand.
UNREADABLE = ["10000-01-01 00:00:00+00", "infinity"]


def _memory_statement(store: Store) -> str:
    # GetMemory's read: one statement with recall on PostgreSQL, the window alone on Citus
    # (its recall is read in steps of its own, docs/scaling.md).
    return "get_memory" if store.citus else "get_memories_recall"


async def _store_by_hand(url: str, statement: str, value: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(statement, {"value": value})


async def _internal(
    call: Awaitable[object], caplog: pytest.LogCaptureFixture, statement: str
) -> None:
    caplog.clear()
    error = await rpc_error(call, Code.INTERNAL, reason="STORED_VALUE_UNREADABLE")
    assert error.details() == MESSAGE
    logged = [r.getMessage() for r in caplog.records if r.name == "server.store.translate"]
    assert any(f"statement {statement}: DataError: " in line for line in logged), logged


@pytest.mark.parametrize("value", UNREADABLE)
async def test_a_session_time_no_datetime_holds_is_internal_on_every_read(
    sessions: Sessions,
    store: Store,
    clean_db: str,
    caplog: pytest.LogCaptureFixture,
    value: str,
) -> None:
    # Before: INVALID_ARGUMENT naming "request" (or session_id): the caller was blamed for
    # a stored row, and retried a request that was never wrong.
    caplog.set_level(logging.ERROR, logger="server.store.translate")
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("hi")]))
    await _store_by_hand(clean_db, "UPDATE sessions SET updated_at = %(value)s::timestamptz", value)
    get = sessions.GetSession(ss.GetSessionRequest(session_id="s"))
    await _internal(get, caplog, "get_session")
    await _internal(sessions.ListSessions(ss.ListSessionsRequest()), caplog, "list_sessions")
    memory = sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    await _internal(memory, caplog, _memory_statement(store))


@pytest.mark.parametrize("value", UNREADABLE)
async def test_a_message_time_no_datetime_holds_is_internal(
    sessions: Sessions,
    store: Store,
    clean_db: str,
    caplog: pytest.LogCaptureFixture,
    value: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="server.store.translate")
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("hi")]))
    await _store_by_hand(clean_db, "UPDATE messages SET created_at = %(value)s::timestamptz", value)
    memory = sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    await _internal(memory, caplog, _memory_statement(store))
    listed = sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    await _internal(listed, caplog, "list_messages")
