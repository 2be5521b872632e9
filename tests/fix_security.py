"""The security tests' own database, projects `a` and `b` with keys, and a server requiring keys."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest

from memstore.v1 import session_service_pb2_grpc, user_service_pb2_grpc
from server.api_keys import new_key
from server.config import Config
from server.serving.app import build_server
from server.serving.tls import SecurityConfig
from server.store import Store
from tests.fix_db import empty_data_tables, scratch_database

#: How long the test server trusts a checked key; revocation tests wait a few of these.
KEY_CACHE_SECONDS = 0.2

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Caller:
    """One project's view of the server: its key as call metadata, and the stubs."""

    project: str
    key: str
    metadata: Metadata
    users: user_service_pb2_grpc.UserServiceStub
    sessions: session_service_pb2_grpc.SessionServiceStub


@pytest.fixture(scope="session")
def secure_db_url(server_url: str) -> Iterator[str]:
    """A database for the security tests only, dropped at the end of the run."""
    # Not the run's shared database: a key there would turn authentication on for the
    # open-mode server every other test uses.
    with scratch_database(server_url, f"memstore_sec_{os.getpid()}") as url:
        yield url


@pytest.fixture(scope="session")
async def secure_store(secure_db_url: str) -> AsyncIterator[Store]:
    """A migrated store over the security database, with projects `a` and `b`."""
    st = await Store.open(secure_db_url, min_size=1, max_size=10)
    await st.migrate()
    await st.create_project("a")
    await st.create_project("b")
    yield st
    await st.close()


async def make_key(store: Store, project: str) -> str:
    """A fresh key of `project`, as its holder sends it."""
    key = new_key()
    await store.create_api_key(project, key, "test")
    return key.text


@pytest.fixture(scope="session")
async def secure_port(secure_store: Store) -> AsyncIterator[int]:
    """A server that requires keys (they exist before it starts), on loopback port 0."""
    await make_key(secure_store, "a")  # authentication is on from the first key
    config = Config(
        host="127.0.0.1",
        port=0,
        security=SecurityConfig(key_cache_seconds=KEY_CACHE_SECONDS),
    )
    server, port = await build_server(config, secure_store)
    await server.start()
    yield port
    await server.stop(None)


@pytest.fixture(scope="session")
async def secure_channel(secure_port: int) -> AsyncIterator[grpc.aio.Channel]:
    """One plaintext loopback channel to the key-requiring server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure_port}") as ch:
        yield ch


@pytest.fixture
async def clean_secure_db(secure_db_url: str, secure_store: Store) -> str:
    """Empties the data tables (projects and keys stay) before a test."""
    return await empty_data_tables(secure_db_url)


async def caller(store: Store, channel: grpc.aio.Channel, project: str) -> Caller:
    """A Caller of `project` holding a key made for this test."""
    key = await make_key(store, project)
    return Caller(
        project,
        key,
        (("authorization", f"Bearer {key}"),),
        user_service_pb2_grpc.UserServiceStub(channel),
        session_service_pb2_grpc.SessionServiceStub(channel),
    )


@pytest.fixture
async def a(secure_store: Store, secure_channel: grpc.aio.Channel, clean_secure_db: str) -> Caller:
    """Project a's caller; the data tables are empty when the test starts."""
    return await caller(secure_store, secure_channel, "a")


@pytest.fixture
async def b(secure_store: Store, secure_channel: grpc.aio.Channel, clean_secure_db: str) -> Caller:
    """Project b's caller."""
    return await caller(secure_store, secure_channel, "b")
