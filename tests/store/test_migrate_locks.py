"""Store: a migration waiting for a table's lock never stalls the running servers' calls, and
a start waiting for another process's migration says so.

Its request for ACCESS EXCLUSIVE queues every later query of the table behind it: while a
long reader (a pg_dump, a report) held the table, a migration waiting for it held every
AddMemory of the servers still running, 22 s in an audit (DEADLINE_EXCEEDED past the
statement timeout). It waits at most MIGRATION_LOCK_SECONDS now, gives way, and tries again.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.store import Store, migrate
from tests.fix_db import has_lock_waiter
from tests.polling import until

#: A migration after the real ones that takes the lock an ALTER TABLE of messages takes.
PROBE = ("9997_lock_probe", "LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;")


@pytest.fixture
def probe_pending(database_url: str, monkeypatch: pytest.MonkeyPatch) -> object:
    real = migrate.migrations()
    monkeypatch.setattr(migrate, "migrations", lambda: [*real, PROBE])
    yield
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE name = %s", [PROBE[0]])


async def test_a_migration_waiting_for_a_lock_lets_the_calls_behind_it_go(
    store: Store, clean_db: str, probe_pending: object
) -> None:
    url = clean_db
    said = [NewMessage(role="kai", role_type="user", content="hello", metadata={})]
    await store.add_memory(P, "s", None, said)
    async with await psycopg.AsyncConnection.connect(url) as reader:
        await reader.execute("SELECT count(*) FROM messages")  # holds it, as a pg_dump does
        migrating = asyncio.ensure_future(store.migrate())
        try:
            assert await until(lambda: has_lock_waiter(url)), "the migration never waited"
            # Queued behind the migration's request, it waited as long as the reader read.
            await asyncio.wait_for(store.add_memory(P, "s", None, said), 30)
            assert not migrating.done()  # it waits on, the reader still reading
        finally:
            await reader.rollback()
        assert await asyncio.wait_for(migrating, 60) == [PROBE[0]]
    _, kept = await store.get_memory(P, "s", 10)
    assert len(kept) == 2


async def test_a_start_waiting_for_another_migration_says_so(
    store: Store, clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An audit: a server starting while another process migrated waited without a word, and
    # its callers met "connection refused" with nothing in its log to say why.
    caplog.set_level(logging.WARNING, logger="server.store.migrate")
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(7283946501)")  # lock_migrations' key
        migrating = asyncio.ensure_future(store.migrate())
        try:
            assert await until(lambda: _said(caplog, "another process's migration"))
            assert not migrating.done()
        finally:
            await other.execute("SELECT pg_advisory_unlock(7283946501)")
        assert await asyncio.wait_for(migrating, 60) == []


async def _said(caplog: pytest.LogCaptureFixture, words: str) -> bool:
    return any(words in r.getMessage() for r in caplog.records)
