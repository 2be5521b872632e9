"""A real memstore gRPC server on port 0 over the run's database, and stubs to call it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from memstore.v1 import session_service_pb2_grpc, user_service_pb2_grpc
from server.config import Config
from server.serving.app import build_server
from server.store import Store


@pytest.fixture(scope="session")
async def grpc_port(store: Store) -> AsyncIterator[int]:
    """Port of a running server over the session's store."""
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    yield port
    await server.stop(None)


@pytest.fixture(scope="session")
async def channel(grpc_port: int) -> AsyncIterator[grpc.aio.Channel]:
    """One channel to the server for the whole run."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


@pytest.fixture
def users(channel: grpc.aio.Channel, clean_db: str) -> user_service_pb2_grpc.UserServiceStub:
    """UserService stub; the tables are empty when the test starts."""
    return user_service_pb2_grpc.UserServiceStub(channel)


@pytest.fixture
def sessions(
    channel: grpc.aio.Channel, clean_db: str
) -> session_service_pb2_grpc.SessionServiceStub:
    """SessionService stub; the tables are empty when the test starts."""
    return session_service_pb2_grpc.SessionServiceStub(channel)
