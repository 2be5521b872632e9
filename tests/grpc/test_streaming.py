"""ListUsersChunked over a real channel: chunking, resume, byte cap, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from tests.grpc import Code, Users, rpc_error, struct

#: A chunk stops growing past this many bytes (ListUsersChunkedRequest.chunk_size).
CHUNK_BYTES = 256 * 1024


async def _make_users(users: Users, n: int, **kw: Any) -> list[str]:
    ids = [f"u{i:04d}" for i in range(n)]
    await asyncio.gather(*(users.CreateUser(us.CreateUserRequest(user_id=u, **kw)) for u in ids))
    return ids


async def _chunks(users: Users, **kw: Any) -> list[us.ListUsersChunkedResponse]:
    return [c async for c in users.ListUsersChunked(us.ListUsersChunkedRequest(**kw))]


def _ids(chunks: list[us.ListUsersChunkedResponse]) -> list[str]:
    return [u.user_id for c in chunks for u in c.users]


async def test_streams_every_user_once_and_resumes(users):
    ids = await _make_users(users, 250)
    chunks = await _chunks(users, chunk_size=100)
    assert [len(c.users) for c in chunks] == [100, 100, 50]
    assert [bool(c.next_page_token) for c in chunks] == [True, True, False]
    streamed = _ids(chunks)
    assert sorted(streamed) == ids and len(set(streamed)) == 250
    keys = [(u.created_at.ToMicroseconds(), u.user_id) for c in chunks for u in c.users]
    assert keys == sorted(keys)
    # Resuming from any chunk's token gives exactly the rest, in the same order.
    for i, chunk in enumerate(chunks[:-1]):
        rest = await _chunks(users, chunk_size=100, page_token=chunk.next_page_token)
        assert _ids(rest) == streamed[(i + 1) * 100 :]
    # The default chunk holds up to 1000 users; a ListUsers token resumes the export too.
    assert [len(c.users) for c in await _chunks(users)] == [250]
    page = await users.ListUsers(us.ListUsersRequest(page_size=30))
    rest = await _chunks(users, page_token=page.next_page_token)
    assert _ids(rest) == streamed[30:]


async def test_chunks_are_capped_by_bytes(users):
    blob = {"blob": "x" * (50 * 1024)}
    ids = await _make_users(users, 14, metadata=struct(blob))
    chunks = await _chunks(users, chunk_size=100)
    assert len(chunks) >= 3
    assert all(0 < c.ByteSize() <= CHUNK_BYTES for c in chunks), [c.ByteSize() for c in chunks]
    assert all(len(c.users) > 0 for c in chunks)
    assert [bool(c.next_page_token) for c in chunks] == [True] * (len(chunks) - 1) + [False]
    streamed = _ids(chunks)
    assert sorted(streamed) == ids and len(set(streamed)) == len(ids)


async def test_empty_table_and_bad_requests(users):
    assert await _chunks(users) == []
    await rpc_error(_chunks(users, chunk_size=-1), Code.INVALID_ARGUMENT, field="chunk_size")
    await rpc_error(
        _chunks(users, page_token="garbage!!"), Code.INVALID_ARGUMENT, field="page_token"
    )


async def test_cancel_mid_stream_and_keep_serving(users):
    await _make_users(users, 40)
    # More cancelled streams than the pool has connections: none may pin one.
    for _ in range(12):
        call = users.ListUsersChunked(us.ListUsersChunkedRequest(chunk_size=1))
        first = await call.read()
        assert len(first.users) == 1
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
    page = await users.ListUsers(us.ListUsersRequest(page_size=100), timeout=10)
    assert len(page.users) == 40
    streamed = _ids(await asyncio.wait_for(_chunks(users, chunk_size=7), timeout=10))
    assert len(streamed) == 40


async def test_session_token_does_not_resume_users(users, sessions):
    await _make_users(users, 3)
    for i in range(3):
        await sessions.CreateSession(ss.CreateSessionRequest(session_id=f"s{i}"))
    token = (await sessions.ListSessions(ss.ListSessionsRequest(page_size=1))).next_page_token
    await rpc_error(_chunks(users, page_token=token), Code.INVALID_ARGUMENT, field="page_token")


async def test_default_chunks_are_at_least_16_kb_but_the_last(users):
    # SPEC: streamed messages are sized by bytes, 16-256 KB. The default chunk holds up to
    # 1000 rows, so even users with nothing but an id fill one past 16 KB.
    ids = [f"u{i:04d}" for i in range(1050)]
    for start in range(0, len(ids), 64):  # a few at a time: the pool has 10 connections
        batch = ids[start : start + 64]
        await asyncio.gather(*(users.CreateUser(us.CreateUserRequest(user_id=u)) for u in batch))
    chunks = await _chunks(users)
    assert [len(c.users) for c in chunks] == [1000, 50]
    assert 16 * 1024 <= chunks[0].ByteSize() <= CHUNK_BYTES
    assert sorted(_ids(chunks)) == ids
