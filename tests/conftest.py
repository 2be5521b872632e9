"""Database fixtures: a real PostgreSQL for every run, never a skip.

With DATABASE_URL set (e.g. the machine's PostgreSQL 15 in CI), a fresh
database is created on that server for this run and dropped afterwards;
without it, the embedded PostgreSQL under .data/test-pg is started. Either way
the schema is migrated once per run and each test starts from empty tables.
"""

from __future__ import annotations

import os

# Before grpc is imported (server.store imports it). The fault tests stop and start an
# embedded PostgreSQL with pg_ctl as another user, so subprocess must fork(); gRPC's fork
# handlers then crashed the child (SIGSEGV in pg_ctl) about one time in six. memstore's
# own command turns them off the same way (server/__main__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from server.store import Store
from tests.databases import scratch_database

ROOT = Path(__file__).resolve().parent.parent
DATA_TABLES = ("messages", "sessions", "users")


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A maintenance URL of the PostgreSQL server this run uses."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from server.serving.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(ROOT / ".data" / "test-pg")
    yield pg.url("postgres")


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A database created for this run, dropped at its end."""
    with scratch_database(server_url, f"memstore_test_{os.getpid()}") as url:
        yield url


@pytest.fixture(scope="session")
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store over the run's database."""
    st = await Store.open(database_url, min_size=1, max_size=10)
    await st.migrate()
    yield st
    await st.close()


@pytest.fixture
async def clean_db(database_url: str, store: Store) -> str:
    """Empties the data tables before a test; returns the database URL for direct checks."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        tables = sql.SQL(", ").join(sql.Identifier(t) for t in DATA_TABLES)
        await conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(tables))
    return database_url
