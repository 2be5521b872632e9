"""Operations over a real channel: health, reflection, and UNAVAILABLE without a database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import psycopg
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from psycopg import sql

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc, user_service_pb2_grpc
from memstore.v1 import user_service_pb2 as us
from server.config import Config
from server.serving.app import build_server
from server.store import Store
from tests.fix_db import database_name, scratch_database
from tests.grpc import Code, msg, rpc_error

SERVICES = ("memstore.v1.UserService", "memstore.v1.SessionService")


@pytest.mark.parametrize("service", ["", *SERVICES])
async def test_health_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_unknown_service_is_not_found(channel):
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert caught.value.code() == Code.NOT_FOUND


async def test_reflection_lists_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="memstore.v1.SessionService"
        )

    responses = [r async for r in stub.ServerReflectionInfo(requests(), timeout=5)]
    names = {s.name for s in responses[0].list_services_response.service}
    assert set(SERVICES) <= names
    # `grpcurl describe` needs the file descriptors, not just the names.
    assert responses[1].file_descriptor_response.file_descriptor_proto


async def test_reflection_resolves_method_symbols(channel):
    # `grpcurl describe memstore.v1.SessionService.AddMemory` asks for a method's file.
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    symbols = [
        "memstore.v1.SessionService.AddMemory",
        "memstore.v1.UserService.ListUsersChunked",
        "memstore.v1.SessionService.NoSuchMethod",
    ]

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for symbol in symbols:
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

    found, found_users, missing = [
        r async for r in stub.ServerReflectionInfo(requests(), timeout=5)
    ]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in found.file_descriptor_response.file_descriptor_proto
    ]
    assert "memstore/v1/session_service.proto" in {f.name for f in files}
    users_files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in found_users.file_descriptor_response.file_descriptor_proto
    ]
    assert "memstore/v1/user_service.proto" in {f.name for f in users_files}
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture
def doomed_database(server_url: str) -> Iterator[tuple[str, str]]:
    """A database of its own (name, url) that the test may drop."""
    with scratch_database(server_url, "memstore_doomed") as url:
        yield database_name(url), url


async def test_unavailable_when_database_is_gone(server_url, doomed_database):
    name, url = doomed_database
    store = await Store.open(url, min_size=1, max_size=2, timeout=2.0)
    try:
        await store.migrate()
        config = Config(host="127.0.0.1", port=0, database_url=url, pool_timeout=2.0)
        server, port = await build_server(config, store)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                users = user_service_pb2_grpc.UserServiceStub(channel)
                sessions = session_service_pb2_grpc.SessionServiceStub(channel)
                await users.CreateUser(us.CreateUserRequest(user_id="before"), timeout=10)
                with psycopg.connect(server_url, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
                    )
                await rpc_error(
                    users.GetUser(us.GetUserRequest(user_id="before"), timeout=20),
                    Code.UNAVAILABLE,
                    reason="DATABASE_UNAVAILABLE",
                )
                await rpc_error(
                    sessions.AddMemory(
                        ss.AddMemoryRequest(session_id="s", messages=[msg("x")]), timeout=20
                    ),
                    Code.UNAVAILABLE,
                    reason="DATABASE_UNAVAILABLE",
                )
        finally:
            await server.stop(None)
    finally:
        await store.close()


async def test_page_tokens_survive_a_restart(store, channel, clean_db):
    users = user_service_pb2_grpc.UserServiceStub(channel)
    for i in range(4):
        await users.CreateUser(us.CreateUserRequest(user_id=f"u{i}"))
    first = await users.ListUsers(us.ListUsersRequest(page_size=2))
    # Another server (a restarted or sibling replica) shares the key kept in the database...
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as other:
            stub = user_service_pb2_grpc.UserServiceStub(other)
            req = us.ListUsersRequest(page_size=2, page_token=first.next_page_token)
            rest = await stub.ListUsers(req, timeout=10)
            assert [u.user_id for u in (*first.users, *rest.users)] == [f"u{i}" for i in range(4)]
    finally:
        await server.stop(None)
    # ...while a server configured with another key refuses the token.
    config = Config(host="127.0.0.1", port=0, token_key=b"some other key of 32 bytes......")
    server, port = await build_server(config, store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as other:
            stub = user_service_pb2_grpc.UserServiceStub(other)
            req = us.ListUsersRequest(page_size=2, page_token=first.next_page_token)
            await rpc_error(
                stub.ListUsers(req, timeout=10), Code.INVALID_ARGUMENT, field="page_token"
            )
    finally:
        await server.stop(None)
