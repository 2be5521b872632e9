"""A PostgreSQL restart: calls fail fast while it is down, and succeed again once it is back.

No wall-clock bound: "fast" is checked against the pool's timeout, made long here so that a
call that waited for it is told apart from one that did not by a margin no load can close,
and against what the store says when it refuses a call without trying the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from server.errors import Unavailable
from server.serving.embedded import EmbeddedPostgres
from server.store import Store
from tests.fix_faults import fresh_database
from tests.polling import until

#: The pool's timeout: what a call waits for a connection when nothing marks the database down.
POOL_TIMEOUT = 15.0
#: What the store says when it refuses a call at once, the database being known down.
FAST_REFUSAL = "retry later"


@pytest.fixture
async def restart_store(restartable: EmbeddedPostgres) -> AsyncIterator[Store]:
    """A migrated store over a fresh database on the restartable server."""
    url = fresh_database(restartable, "restart_test")
    store = await Store.open(url, min_size=2, max_size=4, timeout=POOL_TIMEOUT)
    await store.migrate()
    yield store
    await store.close()


async def _fill_pool(store: Store) -> None:
    await asyncio.gather(*(store.get_user(1, "kept") for _ in range(8)))


async def _timed_failure(store: Store) -> tuple[float, str]:
    start = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        await store.get_user(1, "kept")
    return time.monotonic() - start, str(caught.value)


async def test_fails_fast_while_down_and_recovers(
    restartable: EmbeddedPostgres, restart_store: Store
) -> None:
    await restart_store.create_user(1, "kept", "", "", "", {"n": 1})
    await _fill_pool(restart_store)
    await asyncio.to_thread(restartable.stop_server)
    try:
        # The first call finds the connections gone and waits a second for a fresh one (not
        # the pool's timeout); after it, calls are refused without trying the database.
        first, _ = await _timed_failure(restart_store)
        assert first < POOL_TIMEOUT / 2, first
        for _ in range(5):
            _, text = await _timed_failure(restart_store)
            assert FAST_REFUSAL in text, text
    finally:
        await asyncio.to_thread(restartable.start_server)

    async def answers() -> bool:
        try:
            await restart_store.get_user(1, "kept")
        except Unavailable:
            return False
        return True

    # Healed by the store's own probe; the bound only keeps a store that never heals from
    # hanging the run.
    assert await until(answers, within=60), "no recovery within 60 s of the restart"
    # The write acknowledged before the outage is there, and the pool serves everyone again.
    user = await restart_store.get_user(1, "kept")
    assert user.metadata == {"n": 1}
    await _fill_pool(restart_store)


async def test_restart_between_calls_costs_no_call(
    restartable: EmbeddedPostgres, restart_store: Store
) -> None:
    await restart_store.create_user(1, "kept", "", "", "", {})
    await _fill_pool(restart_store)
    # Every pooled connection is now one the server closed; none may fail a call.
    await asyncio.to_thread(restartable.stop_server)
    await asyncio.to_thread(restartable.start_server)
    users = await asyncio.gather(*(restart_store.get_user(1, "kept") for _ in range(8)))
    assert {u.user_id for u in users} == {"kept"}


async def test_calls_queued_for_a_connection_fail_with_the_first_that_finds_it_gone(
    restartable: EmbeddedPostgres, restart_store: Store
) -> None:
    await restart_store.create_user(1, "kept", "", "", "", {})
    await _fill_pool(restart_store)
    await asyncio.to_thread(restartable.stop_server)
    try:
        # More calls than connections: those that take a pooled connection find it closed
        # and wait a second for a fresh one while the pool tries to reconnect; the others
        # queue behind them for the pool's timeout, and must end with the first failure.
        start = time.monotonic()
        outcomes = await asyncio.gather(
            *(restart_store.ping() for _ in range(8)), return_exceptions=True
        )
        took = time.monotonic() - start
    finally:
        await asyncio.to_thread(restartable.start_server)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert took < POOL_TIMEOUT / 2, took
