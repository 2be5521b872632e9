"""Which search mode migrate leaves a fresh database in, the warning that says why, and that
it is the mode CI means this run to prove.

CI (`.ci/run`) runs the suites with pgvector (the embedded PostgreSQL 18 and the Citus
cluster: MEMSTORE_TEST_EXPECT_VECTORS=1) and without it (the external PostgreSQL 15, reached
as the role memstore_ci, which may not create the untrusted `vector` extension even where it
is installed: =0). Unset (a developer's `make test`), the mode follows the server and role.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psycopg
import pytest

from server.store import Store, migrate
from server.store.migrate import apply_migrations, migrations, required_extension
from tests.fix_db import expected_vectors, scratch_database, usable_extensions

#: The migrations that need pgvector: skipped together, applied together.
VECTOR_MIGRATIONS = [name for name, text in migrations() if required_extension(text) == "vector"]
#: A migration needing an extension no server has: the branch CI's servers (all with pgvector
#: installed) no longer reach with 0007, 0008 and 0014.
ABSENT = ("9999_probe", "-- requires extension: memstore_absent\nCREATE TABLE probe (x int);\n")


@pytest.fixture
def fresh_url(server_url: str) -> Iterator[str]:
    """An empty database on the run's server, dropped afterwards."""
    with scratch_database(server_url, "memstore_mode") as url:
        yield url


async def _catalog(url: str) -> tuple[set[str], bool]:
    """The migrations recorded in the database, and whether its vector table exists."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT name FROM schema_migrations")
        recorded = {str(r[0]) for r in await cur.fetchall()}
        cur = await conn.execute("SELECT to_regclass('message_embeddings') IS NOT NULL")
        row = await cur.fetchone()
    assert row is not None
    return recorded, bool(row[0])


def _available(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
        return row.fetchone() is not None


async def test_migrate_leaves_the_mode_ci_expects_and_says_why(
    fresh_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert VECTOR_MIGRATIONS == [
        "0007_vectors",
        "0008_stored_recall",
        "0014_no_session_vector",
        "0020_vector_recall_kept_at",
        "0021_embedding_models",
    ]
    # What the server and the role allow, read from the catalogs before migrate runs.
    available = _available(fresh_url)
    usable = "vector" in usable_extensions(fresh_url)
    caplog.set_level(logging.WARNING, logger="server.store.migrate")
    store = await Store.open(fresh_url, min_size=1, max_size=2)
    try:
        await store.migrate()
    finally:
        await store.close()
    recorded, tables = await _catalog(fresh_url)
    warnings = [r.getMessage() for r in caplog.records if r.name == "server.store.migrate"]

    assert store.vectors == usable == tables
    expected = expected_vectors()
    if expected is not None:
        assert store.vectors == expected, (
            f"MEMSTORE_TEST_EXPECT_VECTORS={int(expected)}, but migrate left the database "
            f"{'with' if store.vectors else 'without'} pgvector: {warnings}"
        )
    if usable:
        assert set(VECTOR_MIGRATIONS) <= recorded and warnings == []
        return
    # Skipped, unrecorded (they apply at the first start that can create the extension), each
    # with one warning naming the reason: no such extension, or not this role's to create.
    assert not set(VECTOR_MIGRATIONS) & recorded
    reason = "cannot create extension 'vector'" if available else "has no 'vector' extension"
    assert len(warnings) == len(VECTOR_MIGRATIONS)
    for name, warning in zip(VECTOR_MIGRATIONS, warnings, strict=True):
        assert warning.startswith(f"migration {name} skipped: ") and reason in warning


async def test_a_migration_needing_an_extension_the_server_lacks_waits_unrecorded(
    store: Store,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(migrate, "migrations", lambda: [ABSENT])
    caplog.set_level(logging.WARNING, logger="server.store.migrate")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        assert await apply_migrations(conn) == []
    recorded, _ = await _catalog(database_url)
    assert ABSENT[0] not in recorded
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT to_regclass('probe') IS NULL")
        assert await cur.fetchone() == (True,)
    warnings = [r.getMessage() for r in caplog.records if r.name == "server.store.migrate"]
    # (The migrations this database holds are unknown to the one-migration memstore faked
    # here, which says so too: test_a_database_a_newer_memstore_migrated_is_said_at_start.)
    warnings = [m for m in warnings if "newer memstore" not in m]
    assert warnings == [
        "migration 9999_probe skipped: the PostgreSQL server has no 'memstore_absent' extension;"
        " it applies at the first start after the extension is installed"
    ]


async def test_a_database_a_newer_memstore_migrated_is_said_at_start(
    store: Store, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An audit: a server older than the schema served without a word, and one left running
    # through migration 0010 wrote sessions that the counts it added never saw.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (name) VALUES ('9998_from_the_future')")
    try:
        caplog.set_level(logging.WARNING, logger="server.store.migrate")
        assert await store.migrate() == []
        said = [r.getMessage() for r in caplog.records if r.name == "server.store.migrate"]
        assert any("9998_from_the_future" in m and "newer memstore" in m for m in said), said
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM schema_migrations WHERE name = '9998_from_the_future'")
