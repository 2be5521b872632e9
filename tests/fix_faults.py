"""An embedded PostgreSQL the fault tests stop and start, a store and a server over it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest
from psycopg import conninfo as pg_conninfo
from psycopg import sql

from server.config import Config
from server.serving.app import build_server
from server.serving.embedded import EmbeddedPostgres
from server.store import Store
from tests.fix_db import ROOT


@pytest.fixture(scope="session")
def restartable() -> EmbeddedPostgres:
    """An embedded PostgreSQL of the fault tests' own, which they stop and start.

    Never the run's shared server (nor the one DATABASE_URL names), so stopping it disturbs
    no other test and these tests run unchanged against an external PostgreSQL.
    """
    return EmbeddedPostgres(ROOT / ".data" / "test-restart-pg")


def fresh_database(server: EmbeddedPostgres, name: str) -> str:
    """The URL of database `name` on `server`, dropped and created empty."""
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    return pg_conninfo.make_conninfo(server.url("postgres"), dbname=name)


@pytest.fixture
def fault_url(restartable: EmbeddedPostgres) -> str:
    """The URL of a fresh database on the restartable server."""
    return fresh_database(restartable, "fault_test")


@pytest.fixture
async def fault_store(fault_url: str) -> AsyncIterator[Store]:
    """A migrated store over fault_url."""
    store = await Store.open(fault_url, min_size=2, max_size=6, timeout=3)
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
async def fault_channel(fault_store: Store) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server of its own over fault_store."""
    server, port = await build_server(Config(host="127.0.0.1", port=0), fault_store)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)
