"""The run's PostgreSQL: its server, a scratch database, a migrated store, clean tables."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo as pg_conninfo
from psycopg import sql

from server.store import Store
from tests.citus_cluster import cluster_workers, drop_database, drop_forced, prepare_database

ROOT = Path(__file__).resolve().parent.parent
DATA_TABLES = ("messages", "sessions", "users")
#: Set by CI to the search mode the run's server must be in: "1" pgvector (the embedded
#: PostgreSQL 18, the Citus cluster), "0" full-text only (the external PostgreSQL 15, reached
#: as a role that may not create the extension). Unset: no expectation (a developer's run).
EXPECT_VECTORS_ENV = "MEMSTORE_TEST_EXPECT_VECTORS"


def expected_vectors() -> bool | None:
    """Whether this run must find pgvector in use (MEMSTORE_TEST_EXPECT_VECTORS), or None."""
    value = os.environ.get(EXPECT_VECTORS_ENV, "")
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{EXPECT_VECTORS_ENV} must be 0, 1 or unset, not {value!r}")
    return value == "1"


def vector_mode_mismatch(url: str, vectors: bool) -> str | None:
    """Why a store over `url`, in mode `vectors` (`Store.vectors`), is not what CI expects."""
    expected = expected_vectors()
    if expected is None or expected == vectors:
        return None
    mode = {True: "with pgvector", False: "without pgvector (full-text only)"}
    params = pg_conninfo.conninfo_to_dict(url)
    where = f"{params.get('user', '')}@{params.get('host', '')}:{params.get('port', '')}"
    return (
        f"{EXPECT_VECTORS_ENV}={int(expected)}: this run is meant to test memstore "
        f"{mode[expected]}, but the store migrated as {where} runs {mode[vectors]} "
        "(server/store/migrate.py logs why a migration needing an extension was skipped)"
    )


#: Extensions the connected role has or may create in its database: installed there, or
#: available and either the role is a superuser or the extension is trusted (pgvector is not).
USABLE_EXTENSIONS = """
SELECT e.name FROM pg_available_extensions e
JOIN pg_available_extension_versions v ON v.name = e.name AND v.version = e.default_version
WHERE e.installed_version IS NOT NULL
   OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
   OR (v.trusted AND has_database_privilege(current_database(), 'CREATE'))
"""


def usable_extensions(url: str) -> set[str]:
    """The extensions migrate can use in the database `url` names, as the role it names."""
    with psycopg.connect(url) as conn:
        return {str(r[0]) for r in conn.execute(USABLE_EXTENSIONS).fetchall()}


@contextmanager
def scratch_database(
    server_url: str,
    prefix: str,
    *,
    options: sql.Composable | None = None,
    cluster: bool = True,
    workers: list[str] | None = None,
) -> Iterator[str]:
    """Creates an empty database named `prefix_<random>`; yields its URL; drops it after.

    `options` follow CREATE DATABASE's name (e.g. a collation). Under `make test-citus` the
    database spans the cluster, unless `cluster` is False: then it is a plain database of the
    coordinator's PostgreSQL. `workers` names the cluster's workers where they are not
    `make test-citus`'s (a cluster a test package started itself).
    """
    name = f"{prefix}_{secrets.token_hex(4)}"
    if workers is None:
        workers = cluster_workers() if cluster else None
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL(" ").join([create, options]) if options else create)
    url = pg_conninfo.make_conninfo(server_url, dbname=name)
    try:
        if workers:
            # Under `make test-citus`: the database spans the cluster's three nodes.
            prepare_database(url, workers)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            drop_forced(conn, name)
        if workers:
            drop_database(name, workers)


def database_name(url: str) -> str:
    """The database a URL names."""
    return str(pg_conninfo.conninfo_to_dict(url)["dbname"])


async def empty_data_tables(url: str) -> str:
    """Truncates users, sessions and messages (projects and keys stay) and forgets when the
    last purge started (a periodic purge would wait an interval after an earlier test's);
    returns `url`.

    The one way every clean-database fixture starts a test from empty tables.
    """
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        tables = sql.SQL(", ").join(sql.Identifier(t) for t in DATA_TABLES)
        await conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(tables))
        await conn.execute("DELETE FROM settings WHERE name = 'purge_started_at'")
    return url


#: Every session whose kept counts disagree with its rows (none, where nothing was half
#: written): message_count against its live messages, next_sequence not past its last
#: message, or a soft-deleted session holding a live message.
SESSIONS_OFF_THEIR_ROWS = (
    "SELECT s.session_id, s.message_count, count(m.*) FILTER (WHERE m.deleted_at IS NULL),"
    "       s.next_sequence, max(m.sequence)"
    " FROM sessions s LEFT JOIN messages m USING (project_id, session_id)"
    " GROUP BY s.project_id, s.session_id"
    " HAVING s.message_count <> count(m.*) FILTER (WHERE m.deleted_at IS NULL)"
    "    OR s.next_sequence <= coalesce(max(m.sequence), 0)"
    "    OR (s.deleted_at IS NOT NULL"
    "        AND count(m.*) FILTER (WHERE m.deleted_at IS NULL) > 0)"
)


#: Backends of this database, other than the asking one, that wait for a lock.
LOCK_WAITERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
)


async def lock_waiters(url: str, *, cluster: bool = True) -> int:
    """How many backends of the database wait for a lock (e.g. a call a test pinned).

    On a Citus cluster the rows live on the workers, so that is where a call waits: their
    backends of the same database are counted too (unless `cluster` is False: a plain
    database of the coordinator, scratch_database's).
    """
    urls = [url]
    for worker in (cluster_workers() or []) if cluster else []:
        host, port = worker.rsplit(":", 1)
        urls.append(pg_conninfo.make_conninfo(url, host=host, port=port))
    waiting = 0
    for each in urls:
        # A fresh autocommit connection: pg_stat_activity is read once per transaction.
        async with await psycopg.AsyncConnection.connect(each, autocommit=True) as conn:
            cur = await conn.execute(LOCK_WAITERS)
            row = await cur.fetchone()
        assert row is not None
        waiting += int(row[0])
    return waiting


#: Connections holding an open snapshot (server/store/sql/snapshots.sql labels them) in the
#: database the URL names: a hold that passed is over once its holder left this list.
SNAPSHOT_HOLDERS = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name LIKE 'memstore-snapshot %'"
)


async def scalar(url: str, statement: str) -> Any:
    """The one value `statement` answers, over a connection of its own (autocommit: a
    statement Citus would route to a worker reads there, as a caller's would)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(statement)  # type: ignore[arg-type]
        row = await cur.fetchone()
    assert row is not None, statement
    return row[0]


async def has_lock_waiter(url: str, *, cluster: bool = True) -> bool:
    """Whether some backend of the database waits for a lock: the call a test pinned is in."""
    return await lock_waiters(url, cluster=cluster) > 0


async def busy_backends(url: str) -> list[tuple[str, str]]:
    """Backends of the database that hold a transaction or run a query, except the asker."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT state, query FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND (state <> 'idle' OR xact_start IS NOT NULL)"
        )
        return [(str(state), str(query)) for state, query in await cur.fetchall()]


async def at_rest(url: str, store: Store) -> bool:
    """Whether every pooled connection of `store` is back and no backend of `url` is busy."""
    stats = store.pool_stats()
    if stats.get("pool_size", 0) != stats.get("pool_available", 0):
        return False
    return not await busy_backends(url)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A maintenance URL of the PostgreSQL server this run uses.

    With DATABASE_URL set (e.g. the machine's PostgreSQL 15 in CI), that server; without it,
    the embedded PostgreSQL under .data/test-pg.
    """
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
    """A migrated store over the run's database (migrated once per run)."""
    st = await Store.open(database_url, min_size=1, max_size=10)
    await st.migrate()
    # Every test of the run then errors with this, so a CI run cannot pass in the wrong mode
    # (e.g. once pgvector got installed into the server that was to prove the mode without it).
    mismatch = vector_mode_mismatch(database_url, st.vectors)
    if mismatch:
        await st.close()
        pytest.fail(mismatch, pytrace=False)
    yield st
    await st.close()


@pytest.fixture
async def clean_db(database_url: str, store: Store) -> str:
    """Empties the data tables before a test; returns the database URL for direct checks."""
    return await empty_data_tables(database_url)
