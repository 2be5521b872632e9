"""A caller's deadline cancels the query in PostgreSQL and leaves nothing half-written."""

from __future__ import annotations

import grpc
import psycopg
import pytest

from memstore.v1 import user_service_pb2 as pb
from tests.grpc import Users, as_dict, struct
from tests.polling import until


async def _waiting_updates(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND state = 'active'"
            " AND query ILIKE '%%UPDATE users%%' AND pid <> pg_backend_pid()"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_deadline_cancels_the_blocked_query(users: Users, clean_db: str) -> None:
    await users.CreateUser(pb.CreateUserRequest(user_id="locked", metadata=struct({"a": 1})))
    async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
        # An open transaction holds the row lock, so the UpdateUser statement must wait.
        await blocker.execute("SELECT 1 FROM users WHERE user_id = 'locked' FOR UPDATE")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await users.UpdateUser(
                pb.UpdateUserRequest(user_id="locked", metadata=struct({"b": 2})), timeout=0.5
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        async def cancelled() -> bool:
            return await _waiting_updates(clean_db) == 0

        # The server cancels its query: nothing keeps waiting on the lock in PostgreSQL. One
        # left running would wait as long as the blocker holds the lock; the bound only keeps
        # that failure from hanging the run.
        assert await until(cancelled, within=30), "the query still waits in PostgreSQL"
        await blocker.rollback()
    # The cancelled update wrote nothing, and the server still answers.
    got = await users.GetUser(pb.GetUserRequest(user_id="locked"), timeout=5)
    assert as_dict(got.user.metadata) == {"a": 1}
