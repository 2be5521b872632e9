"""The gRPC layer over a real channel, with an in-memory store standing in for PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memstore.v1 import user_service_pb2 as pb
from memstore.v1 import user_service_pb2_grpc as pb_grpc
from server import errors
from server.api import convert
from server.api.chunking import MAX_CHUNK_BYTES
from server.api.tokens import to_micros
from server.config import Config
from server.domain import Page, TimeKey, User, UserRecord, WireRows, WireRun
from server.serving.app import build_server

BASE = datetime(2024, 1, 1, tzinfo=UTC)


class FakeStore:
    """Just the user reads ListUsers and ListUsersChunked need, over a sorted list."""

    #: No vector tables: search would be full-text only (no test here searches).
    vectors = False

    def __init__(self, users: list[User]) -> None:
        self.users = sorted(users, key=lambda u: (u.created_at, u.user_id))
        self.list_calls = 0
        self.rows_read = 0

    async def token_key(self) -> bytes:
        return b"fake-key"

    def on_database_change(self, listener: object) -> None:
        pass  # The fake's database never goes down.

    async def any_api_key(self) -> bool:
        return False  # no keys: the server runs open on loopback

    async def get_user(self, project_id: int, user_id: str) -> User:
        for user in self.users:
            if user.user_id == user_id:
                return user
        raise errors.NotFound(f"no user {user_id!r}")

    async def list_users(self, project_id: int, after: TimeKey | None, limit: int) -> Page[User]:
        self.list_calls += 1
        await asyncio.sleep(0)
        rows = [u for u in self.users if after is None or (u.created_at, u.user_id) > after]
        self.rows_read += len(rows[:limit])
        return Page(rows[:limit], has_more=len(rows) > limit)

    async def list_user_records(
        self,
        project_id: int,
        after: TimeKey | None,
        limit: int,
        *,
        offset: int | None = None,
        count: bool = False,
        budget: int | None = None,
    ) -> Page[UserRecord]:
        # Its users are small: no budget cuts them.
        page = await self.list_users(project_id, after, limit + (offset or 0))
        items = [_record(u) for u in page.items[offset or 0 :]]
        return Page(items, has_more=page.has_more, total_size=len(self.users) if count else None)

    async def list_user_wire(
        self, project_id: int, after: TimeKey | None, limit: int, *, snapshot: str | None = None
    ) -> Page[WireRows[TimeKey]]:
        # The entries as protobuf itself encodes them (the real store has PostgreSQL do it).
        page = await self.list_users(project_id, after, limit)
        if not page.items:
            return Page([], has_more=False)
        entries = [
            pb.ListUsersChunkedResponse(users=[convert.user_to_proto(u)]).SerializeToString()
            for u in page.items
        ]
        keys = [(u.created_at, u.user_id) for u in page.items]
        rows = WireRows(b"".join(entries), [len(e) for e in entries], keys.__getitem__)
        return Page([rows], has_more=page.has_more)

    async def list_user_chunk(
        self, project_id: int, after: TimeKey | None, limit: int, *, snapshot: str | None = None
    ) -> WireRun[TimeKey] | None:
        page = await self.list_user_wire(project_id, after, limit)
        if not page.items:
            return None
        (rows,) = page.items
        return WireRun(rows.entries, len(rows.sizes), rows.key(len(rows.sizes) - 1))


def _record(u: User) -> UserRecord:
    created, updated = to_micros(u.created_at), to_micros(u.updated_at)
    metadata = json.dumps(u.metadata)
    return (u.user_id, u.email, u.first_name, u.last_name, metadata, created, updated, 0)


def _users(count: int, metadata_bytes: int = 0) -> list[User]:
    # Equal timestamps in pairs, so the id tie-breaker matters; microsecond-distinct otherwise.
    return [
        User(
            f"user-{i:05d}",
            f"u{i}@example.com",
            "First",
            "Last",
            {"blob": "x" * metadata_bytes} if metadata_bytes else {},
            BASE + timedelta(microseconds=i // 2),
            BASE,
            0,
        )
        for i in range(count)
    ]


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeStore, grpc.aio.Channel]]:
    store = FakeStore(_users(0))
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)  # type: ignore[arg-type]
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield store, channel
    await server.stop(None)


def _rich(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, fields


async def _export(
    stub: pb_grpc.UserServiceStub, **kwargs: Any
) -> list[pb.ListUsersChunkedResponse]:
    return [chunk async for chunk in stub.ListUsersChunked(pb.ListUsersChunkedRequest(**kwargs))]


async def test_invalid_utf8_is_invalid_argument_not_internal(served: Any) -> None:
    _, channel = served
    for method, call, good in (
        ("GetUser", channel.unary_unary, pb.GetUserRequest(user_id="ab")),
        ("ListUsersChunked", channel.unary_stream, pb.ListUsersChunkedRequest(page_token="ab")),
    ):
        bad = good.SerializeToString().replace(b"ab", b"\xff\xfe")
        rpc = call(f"/memstore.v1.UserService/{method}")
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            result = rpc(bad)
            if method == "ListUsersChunked":
                async for _ in result:
                    pass
            else:
                await result
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _rich(excinfo.value) == ("MALFORMED_REQUEST", ["request"])


async def test_validation_errors_name_fields(served: Any) -> None:
    _, channel = served
    stub = pb_grpc.UserServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await stub.GetUser(pb.GetUserRequest(user_id="a\x00b"))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _rich(excinfo.value) == ("INVALID_ARGUMENT", ["user_id"])
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await stub.GetUser(pb.GetUserRequest(user_id="nobody"))
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _export(stub, chunk_size=-1)
    assert _rich(excinfo.value) == ("INVALID_ARGUMENT", ["chunk_size"])
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _export(stub, page_token="garbage")
    assert _rich(excinfo.value) == ("INVALID_PAGE_TOKEN", ["page_token"])


async def test_chunks_hold_chunk_size_users_and_resume_without_gaps(served: Any) -> None:
    store, channel = served
    store.users = _users(23)
    stub = pb_grpc.UserServiceStub(channel)
    chunks = await _export(stub, chunk_size=5)
    assert [len(c.users) for c in chunks] == [5, 5, 5, 5, 3]
    assert [bool(c.next_page_token) for c in chunks] == [True] * 4 + [False]
    ids = [u.user_id for c in chunks for u in c.users]
    assert ids == [u.user_id for u in store.users]
    for i, chunk in enumerate(chunks[:-1]):
        rest = await _export(stub, chunk_size=5, page_token=chunk.next_page_token)
        assert [u.user_id for c in rest for u in c.users] == ids[(i + 1) * 5 :]
    # ListUsers and ListUsersChunked tokens are interchangeable (same query).
    page = await stub.ListUsers(pb.ListUsersRequest(page_size=7))
    rest = await _export(stub, page_token=page.next_page_token)
    assert [u.user_id for c in rest for u in c.users] == ids[7:]
    later = await stub.ListUsers(pb.ListUsersRequest(page_token=chunks[0].next_page_token))
    assert [u.user_id for u in later.users] == ids[5:]
    assert later.next_page_token == ""


async def test_chunks_are_cut_by_bytes(served: Any) -> None:
    store, channel = served
    store.users = _users(60, metadata_bytes=30_000)
    stub = pb_grpc.UserServiceStub(channel)
    chunks = await _export(stub, chunk_size=1000)
    sizes = [c.ByteSize() for c in chunks]
    assert len(chunks) > 1
    assert max(sizes) <= MAX_CHUNK_BYTES
    # Each chunk but the last is cut only when one more user would not fit.
    assert all(s + 30_000 > MAX_CHUNK_BYTES for s in sizes[:-1])
    assert [u.user_id for c in chunks for u in c.users] == [u.user_id for u in store.users]
    assert chunks[-1].next_page_token == ""
    middle = await _export(stub, page_token=chunks[2].next_page_token)
    assert [u.user_id for c in middle for u in c.users] == [
        u.user_id for c in chunks[3:] for u in c.users
    ]


async def test_large_users_are_read_about_once(served: Any) -> None:
    # Each chunk read chunk_size users, kept the few that fit in its bytes and read the rest
    # again for the next: 200 users of 30 KB were read 5,192 times (each ~26 times; a
    # user of 60 KB ~250 times at 20,000 users), the server's memory rising with each read.
    store, channel = served
    store.users = _users(200, metadata_bytes=30_000)
    chunks = await _export(pb_grpc.UserServiceStub(channel), chunk_size=1000)
    assert [u.user_id for c in chunks for u in c.users] == [u.user_id for u in store.users]
    assert all(len(c.users) == 8 for c in chunks[:-1])  # 8 of 30 KB fit in 256 KiB, not 9
    assert store.rows_read <= 3 * len(store.users), store.rows_read
    # Small users are read once each, a chunk of chunk_size in a read or two.
    store.users, store.rows_read = _users(2500), 0
    chunks = await _export(pb_grpc.UserServiceStub(channel), chunk_size=1000)
    assert [len(c.users) for c in chunks] == [1000, 1000, 500]
    assert store.rows_read <= len(store.users) + 64, store.rows_read


async def test_empty_table_streams_nothing(served: Any) -> None:
    _, channel = served
    assert await _export(pb_grpc.UserServiceStub(channel)) == []


async def test_cancelled_export_stops_reading(served: Any) -> None:
    store, channel = served
    store.users = _users(2000)
    stub = pb_grpc.UserServiceStub(channel)
    call = stub.ListUsersChunked(pb.ListUsersChunkedRequest(chunk_size=1))
    for _ in range(3):
        await call.read()
    call.cancel()
    await asyncio.sleep(0.2)
    calls = store.list_calls
    await asyncio.sleep(0.2)
    assert store.list_calls == calls
    assert calls < 200


async def test_health_and_reflection(served: Any) -> None:
    _, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "memstore.v1.UserService", "memstore.v1.SessionService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
        break
    assert {"memstore.v1.UserService", "memstore.v1.SessionService", "grpc.health.v1.Health"} <= (
        names
    )
