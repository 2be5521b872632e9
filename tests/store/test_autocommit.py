"""Store: a call cancelled while its connection turns autocommit on leaves no pooled
connection in autocommit.

A one-statement block runs in autocommit (StoreBase._connect, `single`). psycopg sets the
flag, then may give the loop a turn before `set_autocommit` returns (`waiting.wait_async`
yields once where the loop has been busy for MAX_BUSY_TIME): a call cancelled in that turn
(an export's read-ahead when its client goes away) gave its connection back to the pool
still in autocommit, and the next transaction on it committed each statement as it ran. A
Restore refused after writing its users kept them; under a CI's load the Restore fuzz found
users no acknowledged Restore had made, and a live message in a soft-deleted session.
The statement timeout's switches (a call's, a migration's) likewise leave no pooled
connection with a bound other than the store believes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import waiting

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import Message, User
from server.errors import DeadlineExceeded, FailedPrecondition
from server.store import Store, admin
from server.store.base import call_deadline
from server.store.db import BoundedConnection

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def one_connection(clean_db: str, store: Store) -> AsyncIterator[Store]:
    """A store whose pool holds one connection: every call gets the same one. Calls without
    a deadline have a 1 s statement timeout."""
    own = await Store.open(clean_db, min_size=1, max_size=1, statement_timeout=1.0)
    try:
        yield own
    finally:
        await own.close()


async def test_a_call_cancelled_as_autocommit_turns_on_leaves_the_next_transaction_whole(
    one_connection: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call is cancelled in the turn psycopg takes after its connection's flag was set.
    switching = _announced(monkeypatch, True)
    call = asyncio.create_task(one_connection.get_memory(P, "any-session", 6))
    await switching.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    monkeypatch.undo()

    # A Restore refused after it wrote its user (its message names no session): nothing of
    # it may stay, on the connection the cancelled call gave back.
    user = User("kept-by-a-refused-restore", "", "", "", {}, NOW, NOW, 0)
    orphan = Message(
        "00000000-0000-4000-8000-000000000001", "no-such-session", 1, "kai", "user", "hi", {},
        NOW, NOW, None,
    )  # fmt: skip
    with pytest.raises(FailedPrecondition):
        await one_connection.restore(P, [user], [], [orphan])
    assert _users(clean_db) == []


def _announced(monkeypatch: pytest.MonkeyPatch, value: bool) -> asyncio.Event:
    """An event set as a connection starts turning autocommit to `value`; psycopg then yields
    after every wait that completes without blocking (as it does on a busy loop), so a task
    waiting on the event runs in the turn after the flag is set."""
    monkeypatch.setattr(waiting, "MAX_BUSY_TIME", 0.0)
    starting = asyncio.Event()
    set_autocommit = BoundedConnection.set_autocommit

    async def announced(self: BoundedConnection, turned: bool) -> None:
        if turned == value:
            starting.set()
        await set_autocommit(self, turned)

    monkeypatch.setattr(BoundedConnection, "set_autocommit", announced)
    return starting


def _users(url: str) -> list[Any]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT user_id FROM users").fetchall()


async def _still_bounded(store: Store) -> None:
    # A call without a deadline, on the store's one connection, ends at the 1 s timeout.
    with pytest.raises(DeadlineExceeded):
        async with store._connect() as conn:
            await conn.execute("SELECT pg_sleep(2.5)")


async def test_a_call_cancelled_as_its_statement_timeout_switches_leaves_no_unknown_bound(
    one_connection: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call whose deadline is far off lifts its connection's statement timeout (one SET in
    # autocommit, StoreBase._bound_for_call) and is cancelled in the turn psycopg takes as
    # autocommit goes off again, after the SET: the connection, its timeout lifted but not
    # known so, must not serve a call without a deadline, which the 1 s timeout bounds.
    switched_back = _announced(monkeypatch, False)

    async def far_off() -> None:
        call_deadline.set(time.monotonic() + 60)
        async with one_connection._connect() as conn:
            await conn.execute("SELECT 1")

    call = asyncio.create_task(far_off())
    await switched_back.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    monkeypatch.undo()
    await _still_bounded(one_connection)


async def test_a_migration_interrupted_as_it_restores_the_timeout_leaves_no_unbounded_connection(
    one_connection: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Store.migrate lifts its connection's statement timeout for the migrations and sets it
    # back after them; a second cancellation interrupting that reset left the pooled
    # connection without a timeout.
    restore = admin.statement_timeout_off

    async def interrupted(conn: BoundedConnection, off: bool) -> None:
        if not off:
            raise asyncio.CancelledError
        await restore(conn, off)

    monkeypatch.setattr(admin, "statement_timeout_off", interrupted)
    with pytest.raises(asyncio.CancelledError):
        await one_connection.migrate()
    monkeypatch.undo()
    await _still_bounded(one_connection)
