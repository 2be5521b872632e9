"""Deadlines on every kind of call, and the statement timeout of calls that set none.

tests/grpc/test_deadlines.py covers UpdateUser; here the same promise for a multi-row
write, a multi-statement transaction, a read and a stream, each blocked on a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb
from server.config import Config
from server.serving.app import build_server
from server.store import Store, base
from tests.fix_db import lock_waiters
from tests.grpc import Sessions, Users, msg
from tests.polling import until
from tests.reliability import record


async def _blocked(
    url: str, lock: str, call: Callable[[], Awaitable[Any]]
) -> tuple[grpc.aio.AioRpcError, float]:
    """Runs `call` while another transaction holds `lock`, until its query was seen waiting
    on the lock in PostgreSQL before the call failed; returns its error and duration."""
    async with await psycopg.AsyncConnection.connect(url) as blocker:
        await blocker.execute(lock)
        for _ in range(_ATTEMPTS):
            start = time.monotonic()
            running = asyncio.ensure_future(call())
            seen = await _seen_waiting(url, running)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await running
            took = time.monotonic() - start
            if seen:
                break
            # Failed before its query was seen waiting (a busy machine, a short deadline):
            # that proves nothing of the cancel below, so the call is made again.
        assert seen, f"the call's query was never seen waiting in {_ATTEMPTS} attempts"

        async def released() -> bool:
            return await lock_waiters(url) == 0

        # The query was cancelled in PostgreSQL: nothing of it waits on the lock any more. A
        # query left running would wait for as long as the blocker holds the lock, so the
        # bound only keeps that failure from hanging the run.
        assert await until(released, within=30), "the cancelled query still waits in PostgreSQL"
        await blocker.rollback()
    return caught.value, took


#: How many times _blocked makes a call that failed before its query was seen waiting.
_ATTEMPTS = 5


async def _seen_waiting(url: str, running: asyncio.Future[Any]) -> bool:
    # Whether a backend of the database was seen waiting for a lock before `running` ended.
    seen = False

    async def waits_or_ended() -> bool:
        nonlocal seen
        seen = await lock_waiters(url) > 0
        return seen or running.done()

    await until(waits_or_ended, within=30)
    return seen


async def _seed(users: Users, sessions: Sessions) -> None:
    await users.CreateUser(upb.CreateUserRequest(user_id="owner"), timeout=10)
    await sessions.AddMemory(
        spb.AddMemoryRequest(session_id="s", user_id="owner", messages=[msg("kept")]), timeout=10
    )


async def test_deadlines_cancel_writes_transactions_reads_and_streams(
    users: Users, sessions: Sessions, clean_db: str
) -> None:
    await _seed(users, sessions)
    session_lock = "SELECT 1 FROM sessions WHERE session_id = 's' FOR UPDATE"
    table_lock = "LOCK TABLE users IN ACCESS EXCLUSIVE MODE"
    calls: dict[str, tuple[str, Callable[[], Awaitable[Any]]]] = {
        "AddMemory": (
            session_lock,
            lambda: sessions.AddMemory(
                spb.AddMemoryRequest(session_id="s", messages=[msg("late")] * 3), timeout=0.5
            ),
        ),
        "DeleteUser": (
            session_lock,
            lambda: users.DeleteUser(upb.DeleteUserRequest(user_id="owner"), timeout=0.5),
        ),
        "GetUser": (
            table_lock,
            lambda: users.GetUser(upb.GetUserRequest(user_id="owner"), timeout=0.5),
        ),
        "ListUsersChunked": (
            table_lock,
            lambda: _drain(users.ListUsersChunked(upb.ListUsersChunkedRequest(), timeout=0.5)),
        ),
    }
    for name, (lock, call) in calls.items():
        error, _ = await _blocked(clean_db, lock, call)
        # The caller's deadline ended the call (half a second; no bound on how late a busy
        # machine lets the client notice): the server's part is the cancelled query, above.
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (name, error)
    # Nothing of the cancelled writes happened: the user, the session, the one message.
    got = await sessions.GetMemory(spb.GetMemoryRequest(session_id="s"), timeout=10)
    assert [m.content for m in got.messages] == ["kept"]
    assert got.session.message_count == 1
    user = await users.GetUser(upb.GetUserRequest(user_id="owner"), timeout=10)
    assert user.user.session_count == 1


async def _drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


@pytest.fixture
async def short_timeout_users(database_url: str, clean_db: str) -> AsyncIterator[Users]:
    """UserService of a server whose statement timeout is one second."""
    store = await Store.open(database_url, min_size=1, max_size=2, statement_timeout=1.0)
    await store.check_vectors()  # which engine (Citus or not), as migrate finds it
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Users(channel)
    await server.stop(None)
    await store.close()


async def test_statement_timeout_bounds_a_call_without_deadline(
    short_timeout_users: Users, clean_db: str
) -> None:
    users = short_timeout_users
    await users.CreateUser(upb.CreateUserRequest(user_id="locked"))
    lock = "SELECT 1 FROM users WHERE user_id = 'locked' FOR UPDATE"
    # No deadline on the call: without the statement timeout it would wait for the lock
    # forever (the blocker holds it until the call ends); wait_for only keeps that from
    # hanging the run.
    update = upb.UpdateUserRequest(user_id="locked", email="x")
    error, took = await _blocked(
        clean_db, lock, lambda: asyncio.wait_for(users.UpdateUser(update), timeout=60)
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "statement timeout" in (error.details() or "")
    # The server's own DEADLINE_EXCEEDED carries an ErrorInfo (a caller's deadline does not).
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "DEADLINE_EXCEEDED"
    # Ended by the 1 s timeout, not sooner (no upper bound: load only makes calls slower).
    assert took > 0.9, took
    got = await users.GetUser(upb.GetUserRequest(user_id="locked"), timeout=10)
    assert got.user.email == ""
    record("statement_timeout", configured_seconds=1.0, call_seconds=round(took, 2))


async def test_a_call_whose_deadline_is_past_the_statement_timeout_runs_to_its_deadline(
    short_timeout_users: Users, clean_db: str
) -> None:
    # The statement timeout (1 s here) bounds calls without a deadline. A caller who gives a
    # DeleteUser of a large user, or any call, a deadline of minutes means it: its statements
    # run up to that deadline. Until 2026-12-02 the timeout ended every call, deadline or
    # not, with DEADLINE_EXCEEDED after 1 s. UpdateUser is one statement (autocommit),
    # DeleteUser a transaction: both wait 2.5 s for a lock here, and then succeed.
    users = short_timeout_users
    for user_id in ("slow-update", "slow-delete"):
        await users.CreateUser(upb.CreateUserRequest(user_id=user_id))
    async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
        for user_id in ("slow-update", "slow-delete"):  # one shard each on Citus
            await blocker.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", [user_id])
        update = asyncio.ensure_future(
            users.UpdateUser(upb.UpdateUserRequest(user_id="slow-update", email="x"), timeout=60)
        )
        delete = asyncio.ensure_future(
            users.DeleteUser(upb.DeleteUserRequest(user_id="slow-delete"), timeout=60)
        )

        async def both_wait() -> bool:
            return await lock_waiters(clean_db) >= 2

        assert await until(both_wait)
        await asyncio.sleep(2.5)
        assert not update.done() and not delete.done()
        await blocker.rollback()
    updated, _ = await asyncio.gather(update, delete)
    assert updated.user.email == "x"
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await users.GetUser(upb.GetUserRequest(user_id="slow-delete"), timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # Both of the server's two connections ran without the timeout; a call without a
    # deadline is bounded by it again, on whichever it gets.
    lock = "SELECT 1 FROM users WHERE user_id = 'slow-update' FOR UPDATE"
    again = upb.UpdateUserRequest(user_id="slow-update", email="y")
    for _ in range(2):
        error, took = await _blocked(
            clean_db, lock, lambda: asyncio.wait_for(users.UpdateUser(again), timeout=60)
        )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "statement timeout" in (error.details() or ""), error.details()
        assert took > 0.9, took


async def test_a_deadline_of_years_leaves_each_statement_bounded(
    short_timeout_users: Users, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deadline further away than the statement timeout lifted it for good: one of years
    # (grpc-timeout 99999999H) let a statement wait on a lock forever. Such a call's
    # statements are bounded by LONGEST_STATEMENT_SECONDS (an hour; 2 s here) instead.
    monkeypatch.setattr(base, "LONGEST_STATEMENT_SECONDS", 2.0)
    users = short_timeout_users
    await users.CreateUser(upb.CreateUserRequest(user_id="far"))
    lock = "SELECT 1 FROM users WHERE user_id = 'far' FOR UPDATE"
    update = upb.UpdateUserRequest(user_id="far", email="x")
    years = 10 * 365 * 24 * 3600.0  # Python's client gives up at once on 99999999H
    error, took = await _blocked(
        clean_db,
        lock,
        lambda: asyncio.wait_for(users.UpdateUser(update, timeout=years), timeout=60),
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "statement timeout" in (error.details() or ""), error.details()
    assert took > 1.9, took
