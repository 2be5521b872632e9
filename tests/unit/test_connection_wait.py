"""A wait for a pooled connection ends with Unavailable when the database is found down, and
with the caller's own cancellation (its deadline) when that comes too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.errors import Unavailable
from server.store.health import DatabaseHealth

#: A server no probe can reach, and fails to at once: the probe runs until the test closes it.
NOWHERE = "host=/nonexistent-memstore-socket-dir dbname=none"


@pytest.fixture
async def health() -> AsyncIterator[DatabaseHealth]:
    """A DatabaseHealth over no pool (its probe never reaches a database to check one)."""
    health = DatabaseHealth(pool=None, conninfo=NOWHERE)  # type: ignore[arg-type]
    yield health
    await health.close()


async def _wait(health: DatabaseHealth, connection: asyncio.Future[Any]) -> Any:
    """What `_checkout` does: wait for a connection inside waiting_for_connection()."""
    with health.waiting_for_connection():
        return await connection


async def _started(task: asyncio.Task[Any]) -> None:
    # Two turns of the loop: the task runs up to its wait.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not task.done()


async def test_a_wait_the_database_going_down_ends_fails_unavailable(
    health: DatabaseHealth,
) -> None:
    connection: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    waiter = asyncio.ensure_future(_wait(health, connection))
    await _started(waiter)
    health.report_lost_connection()
    with pytest.raises(Unavailable, match="went away while this call waited"):
        await waiter
    assert connection.cancelled()
    # The interruption is not left pending on the task.
    assert waiter.cancelling() == 0


async def test_once_down_a_wait_is_refused_before_it_starts(health: DatabaseHealth) -> None:
    health.report_lost_connection()
    connection: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    with pytest.raises(Unavailable, match="retry later"):
        await _wait(health, connection)
    assert not connection.done()


async def test_the_callers_own_cancellation_wins(health: DatabaseHealth) -> None:
    connection: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    waiter = asyncio.ensure_future(_wait(health, connection))
    await _started(waiter)
    # The deadline passes as the database is found down: the caller is cancelled, as it
    # would be with the database up.
    health.report_lost_connection()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_wait_that_ends_with_a_connection_as_it_is_interrupted_goes_on(
    health: DatabaseHealth,
) -> None:
    async def swallowing(connection: asyncio.Future[str]) -> str:
        # Python 3.11's asyncio.wait_for (which psycopg_pool waits with) returns the result
        # of a wait cancelled as it completed, dropping the cancellation.
        try:
            return await asyncio.shield(connection)
        except asyncio.CancelledError:
            return await connection

    async def call(connection: asyncio.Future[str]) -> str:
        with health.waiting_for_connection():
            conn = await swallowing(connection)
        # Nothing of the interruption is left to cancel the call's statements.
        await asyncio.sleep(0)
        return conn

    connection: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(call(connection))
    await _started(task)
    health.report_lost_connection()
    connection.set_result("conn")
    assert await task == "conn"
    assert task.cancelling() == 0
