"""SQL-ish and oversized ids and metadata, huge requests, overload: refused cleanly, never run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc
from server.config import Config
from server.serving.app import build_server
from server.serving.tls import SecurityConfig
from server.store import Store
from tests.fix_db import has_lock_waiter
from tests.fix_security import Caller, make_key
from tests.grpc import Code, as_dict, msg, rpc_error, struct
from tests.polling import until

SQLISH = [
    "alice'; DROP TABLE users; --",
    "' OR '1'='1",
    "%(project_id)s",
    '"; SELECT pg_sleep(10); --',
    "1) OR project_id <> (1",
    "x\\'; TRUNCATE sessions CASCADE; --",
]


async def test_sqlish_ids_and_metadata_are_plain_data(a: Caller, b: Caller) -> None:
    meta = {"'; DELETE FROM users; --": "%(project_id)s", "nested": {"') OR 1=1 --": [1, "'"]}}
    for user_id in SQLISH:
        await a.users.CreateUser(
            us.CreateUserRequest(user_id=user_id, metadata=struct(meta)), metadata=a.metadata
        )
        await a.sessions.AddMemory(
            ss.AddMemoryRequest(session_id=user_id, user_id=user_id, messages=[msg(user_id)]),
            metadata=a.metadata,
        )
        got = await a.users.GetUser(us.GetUserRequest(user_id=user_id), metadata=a.metadata)
        assert got.user.user_id == user_id and as_dict(got.user.metadata) == meta
        await rpc_error(
            b.users.GetUser(us.GetUserRequest(user_id=user_id), metadata=b.metadata),
            Code.NOT_FOUND,
            reason="USER_NOT_FOUND",
        )
        memory = await b.sessions.GetMemory(
            ss.GetMemoryRequest(session_id=user_id), metadata=b.metadata
        )
        assert not memory.found
    listed = await a.users.ListUsers(us.ListUsersRequest(), metadata=a.metadata)
    assert sorted(u.user_id for u in listed.users) == sorted(SQLISH)
    assert not (await b.users.ListUsers(us.ListUsersRequest(), metadata=b.metadata)).users
    # SQL-ish filters and tokens are refused as bad input, not run.
    await rpc_error(
        a.sessions.ListSessions(
            ss.ListSessionsRequest(order_by="created_at; DROP TABLE sessions"),
            metadata=a.metadata,
        ),
        Code.INVALID_ARGUMENT,
        field="order_by",
    )
    await rpc_error(
        a.users.ListUsers(us.ListUsersRequest(page_token="' OR 1=1 --"), metadata=a.metadata),
        Code.INVALID_ARGUMENT,
        field="page_token",
        reason="INVALID_PAGE_TOKEN",
    )


async def test_oversized_ids_and_metadata_are_invalid_argument(a: Caller) -> None:
    md = a.metadata
    await rpc_error(
        a.users.CreateUser(us.CreateUserRequest(user_id="u" * 257), metadata=md),
        Code.INVALID_ARGUMENT,
        field="user_id",
    )
    await rpc_error(
        a.sessions.GetSession(ss.GetSessionRequest(session_id="s" * 100_000), metadata=md),
        Code.INVALID_ARGUMENT,
        field="session_id",
    )
    await rpc_error(
        a.users.CreateUser(
            us.CreateUserRequest(user_id="big", metadata=struct({"pad": "x" * 70_000})),
            metadata=md,
        ),
        Code.INVALID_ARGUMENT,
        field="metadata",
    )
    await rpc_error(
        a.users.CreateUser(us.CreateUserRequest(user_id="nul\x00id"), metadata=md),
        Code.INVALID_ARGUMENT,
        field="user_id",
    )
    # Nothing was written by any of them.
    assert not (await a.users.ListUsers(us.ListUsersRequest(), metadata=md)).users


async def test_a_request_over_16_mib_is_refused_before_it_is_read(a: Caller) -> None:
    content = "x" * (17 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await a.sessions.AddMemory(
            ss.AddMemoryRequest(session_id="huge", messages=[msg(content)]), metadata=a.metadata
        )
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 10


#: The tiny server's pool timeout: long, so a queued call is told from a refused one by
#: whether it is still waiting, not by a bound on how fast the refusal comes.
POOL_TIMEOUT = 60.0


@pytest.fixture
async def tiny_server(secure_db_url: str, clean_secure_db: str) -> AsyncIterator[tuple[int, str]]:
    """A server over a pool of one connection and a queue of one caller; yields (port, key)."""
    store = await Store.open(
        secure_db_url, min_size=1, max_size=1, timeout=POOL_TIMEOUT, max_waiting=1
    )
    key = await make_key(store, "a")
    config = Config(host="127.0.0.1", port=0, security=SecurityConfig(key_cache_seconds=60))
    server, port = await build_server(config, store)
    await server.start()
    yield port, key
    await server.stop(None)
    await store.close()


async def test_overload_answers_resource_exhausted_at_once(
    tiny_server: tuple[int, str], secure_db_url: str
) -> None:
    port, key = tiny_server
    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        users = user_service_pb2_grpc.UserServiceStub(ch)
        await users.CreateUser(us.CreateUserRequest(user_id="hot"), metadata=md)
        async with await psycopg.AsyncConnection.connect(secure_db_url) as blocker:
            # Hold the row so an update pins the pool's only connection while it waits.
            await blocker.execute("SELECT 1 FROM users WHERE user_id = 'hot' FOR UPDATE")
            pinned = asyncio.ensure_future(
                users.UpdateUser(us.UpdateUserRequest(user_id="hot", email="a@x.org"), metadata=md)
            )
            reached = await until(lambda: has_lock_waiter(secure_db_url), within=20)
            assert reached, "the pinned call never reached the database"

            async def timed_get() -> tuple[float, grpc.StatusCode, str]:
                started = time.monotonic()
                try:
                    # Not GetUser: concurrent GetUsers share one statement (coalesce.py), so
                    # they queue there, one pool request per batch, never filling the pool queue.
                    await users.ListUsers(us.ListUsersRequest(page_size=1), metadata=md)
                    code, details = Code.OK, ""
                except grpc.aio.AioRpcError as error:
                    code, details = error.code(), error.details() or ""
                return time.monotonic() - started, code, details

            gets = [asyncio.ensure_future(timed_get()) for _ in range(6)]

            async def five_answered() -> bool:
                return sum(get.done() for get in gets) >= 5

            # One caller queues for the pinned connection, which stays pinned (and the pool's
            # timeout is long) until the blocker lets go; the other five are refused at once
            # instead of queueing without bound: while that one still waits.
            assert await until(five_answered, within=60), "the calls queued"
            waiting = [get for get in gets if not get.done()]
            await blocker.rollback()
            results = await asyncio.gather(*gets)
        refused = [r for r in results if r[1] == Code.RESOURCE_EXHAUSTED]
        assert len(refused) == 5 and len(waiting) == 1, results
        assert all("overloaded" in details for _, _, details in refused)
        assert (await waiting[0])[1] == Code.OK, results
        assert (await pinned).user.email == "a@x.org"


async def test_oversized_call_metadata_is_refused_and_the_server_stays_up(a: Caller) -> None:
    for size in (20_000, 200_000):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await a.users.ListUsers(
                us.ListUsersRequest(), metadata=(("x-api-key", "k" * size),), timeout=10
            )
        # gRPC's own header limit (16 KiB) refuses it before memstore sees the call.
        assert caught.value.code() == Code.RESOURCE_EXHAUSTED, caught.value
    await a.users.ListUsers(us.ListUsersRequest(), metadata=a.metadata, timeout=10)
