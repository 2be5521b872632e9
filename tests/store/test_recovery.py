"""A PostgreSQL restart: calls fail fast while it is down, and succeed soon after it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from server.errors import Unavailable
from server.serving.embedded import EmbeddedPostgres
from server.store import Store
from tests.fix_faults import fresh_database


@pytest.fixture
async def restart_store(restartable: EmbeddedPostgres) -> AsyncIterator[Store]:
    """A migrated store over a fresh database on the restartable server."""
    url = fresh_database(restartable, "restart_test")
    store = await Store.open(url, min_size=2, max_size=4, timeout=3)
    await store.migrate()
    yield store
    await store.close()


async def _fill_pool(store: Store) -> None:
    await asyncio.gather(*(store.get_user(1, "kept") for _ in range(8)))


async def _timed_failure(store: Store) -> float:
    start = time.monotonic()
    with pytest.raises(Unavailable):
        await store.get_user(1, "kept")
    return time.monotonic() - start


async def test_fails_fast_while_down_and_recovers(
    restartable: EmbeddedPostgres, restart_store: Store
) -> None:
    await restart_store.create_user(1, "kept", "", "", "", {"n": 1})
    await _fill_pool(restart_store)
    await asyncio.to_thread(restartable.stop_server)
    try:
        # The first call finds the connections gone; after it, calls fail at once.
        assert await _timed_failure(restart_store) < 2.5
        later = [await _timed_failure(restart_store) for _ in range(5)]
        assert max(later) < 0.5, later
    finally:
        await asyncio.to_thread(restartable.start_server)
    back = time.monotonic()
    while True:
        try:
            user = await restart_store.get_user(1, "kept")
            break
        except Unavailable:
            assert time.monotonic() - back < 5, "no recovery within 5 s of the restart"
            await asyncio.sleep(0.05)
    # The write acknowledged before the outage is there, and the pool serves everyone again.
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
