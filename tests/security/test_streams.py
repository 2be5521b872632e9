"""A key revoked while its stream runs ends the stream with UNAUTHENTICATED within a bound."""

from __future__ import annotations

import asyncio
import time

import grpc
import psycopg
import pytest

from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc
from server.api_keys import split_key
from server.store import Store
from tests.fix_security import KEY_CACHE_SECONDS, Caller
from tests.grpc import Code

USERS = 120
#: Each user's metadata weighs this much: a chunk (<= 256 KiB) holds a handful, and the whole
#: export (~7 MB) is far more than the HTTP/2 windows buffer ahead of a slow reader.
PAD = 60_000


async def _seed_big_users(database_url: str, project: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute(
            "INSERT INTO users (project_id, user_id, metadata)"
            " SELECT p.project_id, 'big-' || lpad(n::text, 4, '0'),"
            "        jsonb_build_object('pad', repeat('x', %s))"
            " FROM projects p, generate_series(1, %s) n WHERE p.name = %s",
            (PAD, USERS, project),
        )


async def test_revoking_a_key_ends_its_running_stream(
    a: Caller, secure_store: Store, secure_port: int, clean_secure_db: str
) -> None:
    await _seed_big_users(clean_secure_db, "a")
    # A reader that takes one chunk at a time, with no window growth (BDP probing off).
    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure_port}", options=options) as ch:
        stub = user_service_pb2_grpc.UserServiceStub(ch)
        call = stub.ListUsersChunked(us.ListUsersChunkedRequest(chunk_size=4), metadata=a.metadata)
        first = await call.read()
        assert len(first.users) == 4
        parts = split_key(a.key)
        assert parts is not None
        await secure_store.revoke_api_key(parts[0])
        revoked_at = time.monotonic()
        await asyncio.sleep(KEY_CACHE_SECONDS * 2)
        received = len(first.users)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (chunk := await call.read()) is not grpc.aio.EOF:
                received += len(chunk.users)
        waited = time.monotonic() - revoked_at
    assert ended.value.code() == Code.UNAUTHENTICATED
    assert ended.value.details() == "the API key is not valid"
    # Chunks already in flight may arrive; the rest of the export never does.
    assert received < USERS, received
    assert waited < 10, waited


async def test_a_stream_that_starts_with_a_revoked_key_sends_nothing(
    a: Caller, secure_store: Store
) -> None:
    await a.users.CreateUser(us.CreateUserRequest(user_id="x"), metadata=a.metadata)
    parts = split_key(a.key)
    assert parts is not None
    await secure_store.revoke_api_key(parts[0])
    await asyncio.sleep(KEY_CACHE_SECONDS * 2)
    call = a.users.ListUsersChunked(us.ListUsersChunkedRequest(), metadata=a.metadata)
    chunks = []
    try:
        chunks = [c async for c in call]
    except grpc.aio.AioRpcError as error:
        assert error.code() == Code.UNAUTHENTICATED
    assert chunks == []
    assert await call.code() == Code.UNAUTHENTICATED
