"""Calls queued for a pooled connection: UNAVAILABLE when PostgreSQL goes away, or their deadline.

A call that holds a connection when PostgreSQL stops fails at once; the calls queued behind it
for the small pool must not wait out the pool's timeout. No wall-clock bound: the pool's
timeout is made so long (60 s) that a queued call which waited for it cannot be taken for one
that did not, and the queued calls' time to fail is set beside the holders' in the same run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import psycopg
import pytest

from memstore.v1 import user_service_pb2 as upb
from server.config import Config
from server.errors import Unavailable
from server.serving.app import build_server
from server.serving.embedded import EmbeddedPostgres
from server.store import Store
from tests.fix_db import lock_waiters
from tests.grpc import Users, struct
from tests.polling import until
from tests.reliability import record

#: The pool's timeout: what a queued call waits when nothing ends its wait sooner.
POOL_TIMEOUT = 60.0
#: Each call's deadline when the test means none to pass: twice the pool's timeout.
NO_DEADLINE = 2 * POOL_TIMEOUT
#: Connections in the pool: every one is held by a call blocked on a row lock.
POOL_SIZE = 2
HOLDERS = [f"h{i}" for i in range(POOL_SIZE)]
QUEUED = [f"q{i}" for i in range(4)]
#: What a call says whose wait for a connection the outage ended.
WAIT_ENDED = "went away while this call waited for a connection"
#: The deadline of a call meant to pass it while queued: a twentieth of the pool's timeout.
LATE_DEADLINE = POOL_TIMEOUT / 20


@pytest.fixture
async def small_pool(fault_url: str) -> AsyncIterator[Store]:
    """A store over the restartable server whose pool has POOL_SIZE connections."""
    store = await Store.open(
        fault_url, min_size=POOL_SIZE, max_size=POOL_SIZE, timeout=POOL_TIMEOUT
    )
    await store.migrate()
    for user_id in HOLDERS + QUEUED:
        await store.create_user(1, user_id, "", "", "", {})
    yield store
    await store.close()


@pytest.fixture
async def blocker(fault_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of the test's own, to hold row locks (closed, not committed, at the end:
    the outage test's dies with the server)."""
    conn = await psycopg.AsyncConnection.connect(fault_url)
    yield conn
    await conn.close()


@pytest.fixture
async def users(small_pool: Store) -> AsyncIterator[Users]:
    """A client of a server of its own over small_pool."""
    server, port = await build_server(Config(host="127.0.0.1", port=0), small_pool)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Users(channel)
    await server.stop(None)


class Timed:
    """A call run as a task: its status code and the monotonic time it was answered."""

    def __init__(self, call: Awaitable[Any]) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.answered_at = 0.0
        self.task = asyncio.ensure_future(self._run(call))

    async def _run(self, call: Awaitable[Any]) -> None:
        try:
            await call
            self.code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            self.code, self.details = error.code(), error.details() or ""
        self.answered_at = time.monotonic()


def _update(
    users: Users, user_id: str, timeout: float = NO_DEADLINE, key: str = "written"
) -> Timed:
    request = upb.UpdateUserRequest(user_id=user_id, metadata=struct({key: True}))
    return Timed(users.UpdateUser(request, timeout=timeout))


async def _saturate(
    url: str, store: Store, users: Users, blocker: psycopg.AsyncConnection[Any]
) -> tuple[list[Timed], list[Timed]]:
    """Every pooled connection held by a call blocked on the blocker's row locks, and the
    QUEUED calls waiting for one; returns (holders, queued)."""
    await blocker.execute("SELECT 1 FROM users WHERE user_id = ANY(%s) FOR UPDATE", [HOLDERS])
    holders = [_update(users, u) for u in HOLDERS]

    async def holding() -> bool:
        return await lock_waiters(url) == len(HOLDERS)

    assert await until(holding, within=30), "the holders never reached the row lock"
    queued = [_update(users, u) for u in QUEUED]

    async def waiting() -> bool:
        return store.pool_stats()["requests_waiting"] == len(QUEUED)

    assert await until(waiting, within=30), store.pool_stats()
    return holders, queued


async def _untouched(store: Store, user_ids: list[str]) -> None:
    """None of these users' updates was written (once the database answers again)."""

    async def answers() -> bool:
        try:
            await store.ping()
        except Unavailable:
            return False
        return True

    assert await until(answers, within=60), "no recovery within 60 s of the restart"
    for user_id in user_ids:
        user = await store.get_user(1, user_id)
        assert user.metadata == {}, (user_id, user.metadata)


async def test_queued_calls_fail_with_the_database_not_the_pool_timeout(
    restartable: EmbeddedPostgres,
    fault_url: str,
    small_pool: Store,
    users: Users,
    blocker: psycopg.AsyncConnection[Any],
) -> None:
    holders, queued = await _saturate(fault_url, small_pool, users, blocker)
    stopped_at = time.monotonic()
    await asyncio.to_thread(restartable.stop_server)
    try:

        async def all_answered() -> bool:
            return all(t.task.done() for t in holders + queued)

        # Half the pool's timeout: a queued call that waited for it is still waiting.
        answered = await until(all_answered, within=POOL_TIMEOUT / 2)
    finally:
        await asyncio.to_thread(restartable.start_server)
    assert answered, [(t.code, t.details) for t in queued]
    # A holder may also succeed: the fast shutdown can end the blocker's backend, and release
    # its lock, before the holder's, which then commits.
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert {t.code for t in holders} <= {unavailable, grpc.StatusCode.OK}, [
        t.details for t in holders
    ]
    assert {t.code for t in queued} == {unavailable}, [(t.code, t.details) for t in queued]
    # What the store says of a call it stopped waiting for a connection (server/store/health.py).
    assert all(WAIT_ENDED in t.details for t in queued), [t.details for t in queued]
    holder_seconds = sorted(t.answered_at - stopped_at for t in holders)
    queued_seconds = sorted(t.answered_at - stopped_at for t in queued)
    # The queued calls learn of the outage from the holders' failure: no later than a few
    # times the holders' own time to fail, where a wait for the pool would be hundreds.
    ratio = queued_seconds[-1] / holder_seconds[-1]
    record(
        "pool_wait_outage",
        holders_failed_after=[round(s, 3) for s in holder_seconds],
        queued_failed_after=[round(s, 3) for s in queued_seconds],
        slowest_queued_over_slowest_holder=round(ratio, 2),
    )
    assert ratio < 5, (holder_seconds, queued_seconds)
    await _untouched(small_pool, QUEUED)


async def test_a_queued_call_ends_at_its_deadline_and_writes_nothing(
    fault_url: str, small_pool: Store, users: Users, blocker: psycopg.AsyncConnection[Any]
) -> None:
    holders, queued = await _saturate(fault_url, small_pool, users, blocker)
    # A deadline far shorter than the pool's timeout, long enough to see the call queued.
    late = _update(users, "q0", timeout=LATE_DEADLINE, key="late")

    async def queued_too() -> bool:
        return small_pool.pool_stats()["requests_waiting"] == len(QUEUED) + 1

    assert await until(queued_too, within=LATE_DEADLINE), small_pool.pool_stats()
    await late.task
    assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED, (late.code, late.details)
    await blocker.rollback()
    await asyncio.gather(*(t.task for t in holders + queued))
    assert {t.code for t in holders + queued} == {grpc.StatusCode.OK}

    async def settled() -> bool:
        stats = small_pool.pool_stats()
        return stats["requests_waiting"] == 0 and stats["pool_available"] == POOL_SIZE

    # Every connection back in the pool, and no call waiting for one: a late call still
    # queued would have had its turn by now.
    assert await until(settled, within=30), small_pool.pool_stats()
    # The late call never reached the database, not even once connections were free: its
    # handler stopped waiting for one at its deadline.
    q0 = await small_pool.get_user(1, "q0")
    assert q0.metadata == {"written": True}, q0.metadata
