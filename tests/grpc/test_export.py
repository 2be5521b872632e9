"""A slow ListUsersChunked consumer pins no pooled connection and no transaction."""

from __future__ import annotations

import asyncio

import grpc

from memstore.v1 import user_service_pb2 as us
from server.store import Store
from tests.fix_db import at_rest, busy_backends
from tests.grpc import Users
from tests.polling import until


async def test_paused_stream_holds_no_connection(users: Users, clean_db: str, store: Store) -> None:
    ids = [f"user-{i:04d}" for i in range(300)]
    await asyncio.gather(*(users.CreateUser(us.CreateUserRequest(user_id=u)) for u in ids))
    call = users.ListUsersChunked(us.ListUsersChunkedRequest(chunk_size=50))
    first = await call.read()
    assert isinstance(first, us.ListUsersChunkedResponse)
    assert len(first.users) == 50
    # The client stops reading. Between chunks the server holds no transaction open (no
    # server-side cursor to keep VACUUM back) and every pooled connection is back in the pool
    # once the prefetch of the next batch is done.
    # Checked at one moment, not in steps: between two reads a health ping or a key check
    # may borrow a connection for a moment, which the paused stream does not hold.
    assert await until(lambda: at_rest(clean_db, store)), (
        store._pool.get_stats(),
        await busy_backends(clean_db),
    )
    # Reading on resumes the export with no skip or repeat.
    streamed = [u.user_id for u in first.users]
    while (chunk := await call.read()) is not grpc.aio.EOF:
        assert isinstance(chunk, us.ListUsersChunkedResponse)
        streamed.extend(u.user_id for u in chunk.users)
    # (Created concurrently, so the stream's created_at order is not the ids' order.)
    assert len(streamed) == len(set(streamed)) == 300
    assert sorted(streamed) == ids
