"""A stored value the server cannot read is the server's fault: INTERNAL, not the caller's."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Unreadable:
    """Session `s` holding one message, into which a test stores `value` by hand."""

    value: str
    url: str
    memory_statement: str
    caplog: pytest.LogCaptureFixture

    async def store(self, statement: str) -> None:
        """Runs `statement` (an UPDATE taking %(value)s) outside the server."""
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute(statement, {"value": self.value})

    async def internal(self, call: Awaitable[object], statement: str) -> None:
        """`call` fails INTERNAL telling the caller only MESSAGE; the log names `statement`."""
        self.caplog.clear()
        error = await rpc_error(call, Code.INTERNAL, reason="STORED_VALUE_UNREADABLE")
        assert error.details() == MESSAGE
        log = [r.getMessage() for r in self.caplog.records if r.name == "server.store.translate"]
        assert any(f"statement {statement}: DataError: " in line for line in log), log


@pytest.fixture(params=UNREADABLE)
async def unreadable(
    request: pytest.FixtureRequest,
    sessions: Sessions,
    store: Store,
    clean_db: str,
    caplog: pytest.LogCaptureFixture,
) -> Unreadable:
    """Session `s` with one message, stored through the server; each of UNREADABLE in turn."""
    caplog.set_level(logging.ERROR, logger="server.store.translate")
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("hi")]))
    return Unreadable(request.param, clean_db, _memory_statement(store), caplog)


async def test_a_session_time_no_datetime_holds_is_internal_on_every_read(
    sessions: Sessions, unreadable: Unreadable
) -> None:
    # Before: INVALID_ARGUMENT naming "request" (or session_id): the caller was blamed for
    # a stored row, and retried a request that was never wrong.
    await unreadable.store("UPDATE sessions SET updated_at = %(value)s::timestamptz")
    await unreadable.internal(
        sessions.GetSession(ss.GetSessionRequest(session_id="s")), "get_session"
    )
    # The default page (50 sessions could pass a page) is read up to the page's bytes.
    listed = sessions.ListSessions(ss.ListSessionsRequest())
    await unreadable.internal(listed, "list_sessions_budgeted")
    listed = sessions.ListSessions(ss.ListSessionsRequest(page_size=30))
    await unreadable.internal(listed, "list_sessions")
    memory = sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    await unreadable.internal(memory, unreadable.memory_statement)


async def test_a_message_time_no_datetime_holds_is_internal(
    sessions: Sessions, unreadable: Unreadable
) -> None:
    await unreadable.store("UPDATE messages SET created_at = %(value)s::timestamptz")
    memory = sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    await unreadable.internal(memory, unreadable.memory_statement)
    listed = sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    await unreadable.internal(listed, "list_messages")
